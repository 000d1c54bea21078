"""QAT + MatQuant (`--method qat`): end-to-end training of the target linear weights with

    Σ_r λ_r · L_r(model whose targets are fake-quantized to the r-bit slice of the int-c master)

(one forward + backward per slice r per micro-batch; see `objectives.py` for L_r and co-distillation).

Design (documented choices):
- Trainable: only the target weights (an fp32 master copy each); everything else is frozen. Biases are frozen.
- Quantizer: fake quantization with straight-through estimators (`matquant.quant.fake_quant_ste`). With
  `qparams='minmax'` (default) α and z are recomputed from the current weights at every forward (MinMax, no
  gradient through them), exactly as the final codes are computed; with `qparams='learnable'` they start at
  MinMax and are trained with the weights (LSQ-style), and the final codes use the learned α, z. In both modes
  α, z are rounded to the storage dtype (`param_dtype`) in the forward pass, so training sees the stored grid.
- Optimiser: AdamW; linear warm-up then cosine decay to `min_lr_ratio·lr`; gradient clipping; gradient
  accumulation; bf16 autocast on CUDA (fp32 master weights), fp32 on CPU.
- Data: the calibration windows are the training set. The global batch of step s is a pure function of
  (seed, s): windows are visited in a seeded random permutation per epoch, so resume needs no loader state.
- RNG: reseeded at every step from (seed, step, rank), so dropout (if any) is reproducible after resume.
- Distributed: under `torchrun` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel (gloo on CPU,
  nccl on CUDA); each rank takes its share of every global batch; rank 0 writes checkpoints.
- Checkpoints: every `save_every` steps and at the end, `work_dir/step-XXXXXXXX/` (trainable.safetensors,
  optimizer.safetensors, state.json), written atomically, then `work_dir/latest.json` is atomically pointed at
  it. Re-running the same command resumes from the latest one and ends bit-identical to an uninterrupted run.
  A run with different settings refuses to resume from the folder.
- A non-finite loss stops training with an error; the optimiser step is not taken and the last good checkpoint
  is kept.
- Output: final codes = MinMax round-half-up at the master bits of the trained weights (`quantize_minmax`), or
  `quantize_codes` with the learned α, z.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from matquant.algorithms.objectives import Objective, build_objective
from matquant.format.atomic import atomic_dir, atomic_write_json
from matquant.models.targets import linear_weight
from matquant.nn.replace import set_submodule
from matquant.quant.minmax import (
    QuantizedWeight, grouped, minmax_params, quantize_codes, quantize_minmax, resolve_group_size,
)
from matquant.quant.rounding import round_half_up
from matquant.quant.ste import fake_quant_ste

QPARAM_MODES = ("minmax", "learnable")
STATE_VERSION = 1


class TrainingDiverged(ValueError, FloatingPointError):
    """The training loss became NaN/Inf."""


@dataclass
class QATConfig:
    steps: int = 200
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int | None = None  # default: 5% of steps (at least 1)
    min_lr_ratio: float = 0.1
    batch_size: int = 1  # windows per micro-batch per process
    grad_accum: int = 1
    max_grad_norm: float = 1.0  # 0 disables clipping
    qparams: str = "minmax"
    seed: int = 0
    save_every: int = 50  # 0: only the final checkpoint
    work_dir: str | None = None  # None: no checkpoints (no resume)
    device: str = "auto"  # auto: cuda (this rank's GPU) if available, else cpu
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    extra: dict = field(default_factory=dict)

    def validate(self) -> "QATConfig":
        def need(ok, msg):
            if not ok:
                raise ValueError(msg)

        need(isinstance(self.steps, int) and self.steps >= 1, f"--steps must be a positive integer, got {self.steps!r}.")
        need(math.isfinite(self.lr) and self.lr > 0, f"--lr must be a positive number, got {self.lr!r}.")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay!r}.")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1,
             f"--batch-size-train must be a positive integer, got {self.batch_size!r}.")
        need(isinstance(self.grad_accum, int) and self.grad_accum >= 1,
             f"--grad-accum must be a positive integer, got {self.grad_accum!r}.")
        need(self.save_every >= 0, f"--save-every must be >= 0, got {self.save_every!r}.")
        need(0 <= self.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio!r}.")
        need(self.max_grad_norm >= 0, f"--max-grad-norm must be >= 0, got {self.max_grad_norm!r}.")
        need(self.qparams in QPARAM_MODES, f"--qparams must be one of {', '.join(QPARAM_MODES)}, got {self.qparams!r}.")
        if self.warmup_steps is None:
            self.warmup_steps = max(1, self.steps // 20)
        need(0 <= self.warmup_steps <= self.steps,
             f"--warmup-steps must be in 0..steps ({self.steps}), got {self.warmup_steps!r}.")
        return self


def lr_at(cfg: QATConfig, step: int) -> float:
    """Learning rate of update `step` (0-based): linear warm-up, then cosine to min_lr_ratio·lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + (cfg.lr - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- fake-quantized layer
class _SlicedMinMaxSTE(torch.autograd.Function):
    """Memory-lean `fake_quant_ste` for α, z that carry no gradient (qparams='minmax').

    Forward: α·(S(clamp(⌊w/α + z + ½⌋), r) − z), the same values as `fake_quant_ste`. Backward: the same
    straight-through gradient, which for detached α, z is the upstream gradient times the mask of weights that no
    clamp cut off (master range, and the paper-mode slice clamp), so only that boolean mask is kept for backward
    instead of the several float intermediates autograd would store.
    """

    @staticmethod
    def forward(ctx, w, scale, zero, master_bits: int, bits: int, mode: str):
        gs = w.shape[1] // scale.shape[1]
        g = grouped(w.detach(), gs)
        s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
        x = round_half_up(g / s + z)
        keep = (x >= 0) & (x <= 2**master_bits - 1)
        q = x.clamp(0, 2**master_bits - 1)
        shift = master_bits - bits
        if shift:
            step = float(2**shift)
            if mode == "nested":
                q = torch.floor(q / step) * step + (step - 1) / 2.0
            else:
                qs = round_half_up(q / step)
                if mode == "paper":
                    keep &= qs <= 2**bits - 1
                    qs = qs.clamp(0, 2**bits - 1)
                q = qs * step
        ctx.save_for_backward(keep)
        ctx.shape = w.shape
        return (s * (q - z)).reshape(w.shape)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return (grad.reshape(keep.shape) * keep).reshape(ctx.shape), None, None, None, None, None


class FakeQuantLinear(nn.Module):
    """A target linear during QAT: fp32 master weight [out, in], fake-quantized to the current slice."""

    def __init__(self, weight: torch.Tensor, bias, group_size: int, master_bits: int, symmetric: bool,
                 param_dtype: torch.dtype, qparams: str, slicing: str):
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = bias  # the original (frozen) bias, or None
        self.group_size, self.master_bits, self.symmetric = group_size, master_bits, symmetric
        self.param_dtype, self.mode, self.slicing = param_dtype, qparams, slicing
        self.bits = master_bits
        if qparams == "learnable":
            s, z = minmax_params(self.weight.detach(), master_bits, group_size, symmetric)
            self.scale = nn.Parameter(s.to(param_dtype).float())
            self.zero = nn.Parameter(z.to(param_dtype).float(), requires_grad=not symmetric)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "minmax":  # cached until the optimizer changes the weight (in-place: _version moves)
            key = (self.weight._version, self.weight.data_ptr())
            if getattr(self, "_qp_key", None) != key:
                with torch.no_grad():
                    s, z = minmax_params(self.weight, self.master_bits, self.group_size, self.symmetric)
                    self._qp = (s.to(self.param_dtype).float(), z.to(self.param_dtype).float())
                self._qp_key = key
            return self._qp
        s = self.scale.clamp_min(1e-8)
        s = s + (s.to(self.param_dtype).float() - s).detach()  # storage-dtype rounding, straight-through
        z = self.zero + (self.zero.to(self.param_dtype).float() - self.zero).detach()
        return s, z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, z = self.qparams()
        if self.mode == "minmax":
            w = _SlicedMinMaxSTE.apply(self.weight, s, z, self.master_bits, self.bits, self.slicing)
        else:
            w = fake_quant_ste(self.weight, s, z, self.master_bits, self.bits, self.slicing)
        return F.linear(x, w, self.bias)

    def final(self) -> QuantizedWeight:
        w = self.weight.detach().float().cpu()
        if self.mode == "minmax":
            return quantize_minmax(w, self.master_bits, self.group_size, self.symmetric, self.param_dtype)
        s = self.scale.detach().clamp_min(1e-8).to(self.param_dtype).cpu()
        z = self.zero.detach().to(self.param_dtype).cpu()
        return QuantizedWeight(codes=quantize_codes(w, s, z, self.master_bits), scales=s, zeros=z,
                               bits=self.master_bits, group_size=self.group_size)

    def trainable(self) -> dict[str, nn.Parameter]:
        out = {"weight": self.weight}
        if self.mode == "learnable":
            out["scale"] = self.scale
            if not self.symmetric:
                out["zero"] = self.zero
        return out


# ---------------------------------------------------------------- distributed helpers
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialized_here: bool = False

    @property
    def on(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str = "auto") -> Dist:
    """Join the torch.distributed job set up by torchrun (WORLD_SIZE > 1); a no-op for a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    use_cuda = torch.cuda.is_available() and device_pref != "cpu"
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), local, initialized_here=True)


def is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def finish_distributed() -> None:
    """Wait for every rank, then leave the process group (call once, after rank 0 has written its output)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _barrier(d: Dist) -> None:
    if d.on:
        import torch.distributed as dist

        dist.barrier()


def _pick_device(pref: str, d: Dist) -> torch.device:
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("--device cuda requested but no CUDA GPU is available; use --device cpu.")
        return torch.device(f"cuda:{d.local_rank}") if pref == "cuda" else torch.device(pref)
    return torch.device(pref)


# ---------------------------------------------------------------- data order
def sample_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Window indices of global samples start..start+count-1: a seeded permutation per epoch."""
    out, cache = [], {}
    for i in range(start, start + count):
        epoch, pos = divmod(i, n)
        if epoch not in cache:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cache[epoch] = torch.randperm(n, generator=g)
        out.append(int(cache[epoch][pos]))
    return out


def _step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


# ---------------------------------------------------------------- checkpoints
def _fingerprint(objective: Objective, cfg: QATConfig, targets, calib: torch.Tensor, weights_hash: str,
                 world: int) -> dict:
    keep = {k: v for k, v in asdict(cfg).items() if k not in ("save_every", "work_dir", "device", "extra")}
    keep["betas"] = list(cfg.betas)
    return {"objective": objective.to_dict(), "config": keep, "targets": list(targets), "world_size": world,
            "calib_shape": list(calib.shape), "calib_sha256": hashlib.sha256(calib.numpy().tobytes()).hexdigest(),
            "weights_sha256": weights_hash}


def _hash_weights(layers: dict[str, FakeQuantLinear]) -> str:
    h = hashlib.sha256()
    for name, m in layers.items():
        h.update(name.encode())
        h.update(m.weight.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _param_table(layers: dict[str, FakeQuantLinear]) -> dict[str, nn.Parameter]:
    return {f"{name}.{k}": p for name, m in layers.items() for k, p in m.trainable().items()}


def save_training_state(work_dir: Path, step: int, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer,
                        state: dict) -> Path:
    """Atomically write checkpoint `step` and point latest.json at it; older checkpoints are removed."""
    d = work_dir / f"step-{step:08d}"
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    with atomic_dir(d, overwrite=True) as tmp:
        save_file({k: p.detach().cpu().contiguous() for k, p in params.items()}, str(tmp / "trainable.safetensors"))
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        atomic_write_json(tmp / "state.json", {**state, "step": step, "optimizer_param_groups": sd["param_groups"],
                                               "optimizer_scalars": scalars})
    atomic_write_json(work_dir / "latest.json", {"step": step, "dir": d.name})
    for old in work_dir.glob("step-*"):
        if old.is_dir() and old.name != d.name:
            shutil.rmtree(old, ignore_errors=True)
    return d


def latest_checkpoint(work_dir: Path) -> Path | None:
    p = work_dir / "latest.json"
    if not p.exists():
        return None
    try:
        d = work_dir / json.loads(p.read_text())["dir"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{p} is corrupt ({e}); delete {work_dir} to restart training from scratch.") from None
    if not (d / "state.json").exists():
        raise ValueError(f"{p} points at {d}, which is missing; delete {work_dir} to restart from scratch.")
    return d


def load_training_state(d: Path, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer) -> dict:
    state = json.loads((d / "state.json").read_text())
    with safe_open(str(d / "trainable.safetensors"), framework="pt") as f:
        missing = set(params) - set(f.keys())
        if missing:
            raise ValueError(f"checkpoint {d} lacks {sorted(missing)[:3]}; delete it to restart from scratch.")
        with torch.no_grad():
            for k, p in params.items():
                p.copy_(f.get_tensor(k).to(p.device))
    opt_state: dict = {}
    with safe_open(str(d / "optimizer.safetensors"), framework="pt") as f:
        for key in f.keys():
            _, idx, name = key.split(".", 2)
            opt_state.setdefault(int(idx), {})[name] = f.get_tensor(key)
    for key, v in state.get("optimizer_scalars", {}).items():
        idx, name = key.split(".", 1)
        opt_state.setdefault(int(idx), {})[name] = v
    groups = state["optimizer_param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": opt_state, "param_groups": groups})
    return state


# ---------------------------------------------------------------- training
@dataclass
class QATResult:
    qweights: dict[str, QuantizedWeight]
    history: list[dict]
    steps: int
    tokens: int  # training tokens seen (all processes), counted once per window (not per slice)
    seconds: float  # wall time of the steps run in this call
    resumed_from: int  # step of the checkpoint this call resumed from (0: fresh)
    weights: dict[str, torch.Tensor]  # trained fp32 weights (before the final rounding)


def _soft_ce(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    return -(teacher.softmax(-1) * student.log_softmax(-1)).sum(-1).mean()


def _term_loss(term, logits, labels, teacher_logits) -> torch.Tensor:
    parts = []
    if term.ground_truth:
        parts.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1)))
    if term.teacher is not None:
        parts.append(_soft_ce(logits, teacher_logits[term.teacher]))
    return sum(parts) / len(parts)


def _set_layer_bits(layers, bits: int) -> None:
    for m in layers.values():
        m.bits = bits


def train_qat(model, targets: list[str], calib: torch.Tensor, objective: Objective, cfg: QATConfig, *,
              group_size: int, symmetric: bool, param_dtype: torch.dtype, progress: bool = True,
              step_callback=None) -> QATResult:
    """Run (or resume) QAT; returns the final codes and the loss history. See the module docstring."""
    cfg.validate()
    if not torch.is_tensor(calib) or calib.dim() != 2 or calib.shape[1] < 2 or calib.shape[0] < 1 \
            or calib.dtype not in (torch.int64, torch.int32):
        raise ValueError("QAT needs training windows: an integer token-id tensor [n_windows, seqlen>=2].")
    calib = calib.long().cpu()
    d = init_distributed(cfg.device)
    device = _pick_device(cfg.device, d)
    use_amp = cfg.amp and device.type == "cuda"
    mods = dict(model.named_modules())
    originals = {n: mods[n] for n in targets}
    layers: dict[str, FakeQuantLinear] = {}
    for n, m in originals.items():
        w = linear_weight(m)
        gs = resolve_group_size(w.shape[1], group_size)
        layers[n] = FakeQuantLinear(w, getattr(m, "bias", None), gs, objective.master_bits, symmetric,
                                    param_dtype, cfg.qparams, objective.slicing)
    fp = _fingerprint(objective, cfg, targets, calib, _hash_weights(layers), d.world)
    work_dir = Path(cfg.work_dir) if cfg.work_dir else None

    was_training = model.training
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    orig_device = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    for n, m in layers.items():
        set_submodule(model, n, m)
    ddp = None
    try:
        model.to(device)
        params = _param_table(layers)
        opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        start, history = 0, []
        if work_dir is not None:
            ck = latest_checkpoint(work_dir)
            if ck is not None:
                state = json.loads((ck / "state.json").read_text())
                if state.get("fingerprint") != fp:
                    diff = sorted(k for k in fp if state.get("fingerprint", {}).get(k) != fp[k])
                    raise ValueError(f"{work_dir} holds a QAT run with different settings (differs in: "
                                     f"{', '.join(diff)}). Rerun the identical command to resume, or pass a new "
                                     "--work-dir (or delete that folder) to start over.")
                state = load_training_state(ck, params, opt)
                start, history = state["step"], state["history"]
                if d.main and progress:
                    print(f"QAT: resuming from {ck} (step {start}/{cfg.steps})")
        if d.on:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                      broadcast_buffers=False)
        fwd = ddp if ddp is not None else model
        model.train()
        n_win, seqlen = calib.shape
        per_rank = cfg.batch_size
        global_batch = per_rank * cfg.grad_accum * d.world
        t0 = time.time()
        bar = tqdm(range(start, cfg.steps), desc=f"QAT {objective.notation()}", disable=not (progress and d.main),
                   initial=start, total=cfg.steps)
        for step in bar:
            torch.manual_seed(_step_seed(cfg.seed, step, d.rank))
            lr = lr_at(cfg, step)
            for g in opt.param_groups:
                g["lr"] = lr
            opt.zero_grad(set_to_none=True)
            stats = torch.zeros(len(objective.terms) + 1, dtype=torch.float64)
            idx_all = sample_indices(n_win, cfg.seed, step * global_batch, global_batch)
            for micro in range(cfg.grad_accum):
                lo = (micro * d.world + d.rank) * per_rank
                x = calib[idx_all[lo: lo + per_rank]].to(device)
                labels = x[:, 1:]
                teacher_logits = {}
                for tb in objective.teachers:  # teachers that are not trained themselves: no-grad forward
                    if tb not in objective.bits:
                        _set_layer_bits(layers, tb)
                        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=use_amp):
                            teacher_logits[tb] = fwd(input_ids=x, use_cache=False).logits[:, :-1].float()
                for i, term in enumerate(objective.terms):
                    last = micro == cfg.grad_accum - 1 and i == len(objective.terms) - 1
                    with (nullcontext() if ddp is None or last else ddp.no_sync()):
                        _set_layer_bits(layers, term.bits)
                        with torch.autocast(device.type, torch.bfloat16, enabled=use_amp):
                            logits = fwd(input_ids=x, use_cache=False).logits[:, :-1].float()
                        loss = _term_loss(term, logits, labels, teacher_logits)
                        if term.bits in objective.teachers:
                            teacher_logits[term.bits] = logits.detach()
                        (loss * (term.weight / cfg.grad_accum)).backward()
                    lv = loss.detach().double().cpu()
                    stats[i] += lv / cfg.grad_accum
                    if not torch.isfinite(lv):
                        stats[-1] += 1
            if d.on:
                import torch.distributed as dist

                s = stats.to(device) if device.type == "cuda" else stats
                dist.all_reduce(s)
                stats = s.cpu()
                stats[:-1] /= d.world
            if stats[-1] > 0 or not torch.isfinite(stats[:-1]).all():
                bad = [f"int{t.bits}" for t, v in zip(objective.terms, stats[:-1].tolist()) if not math.isfinite(v)]
                where = (f"the last good checkpoint (step {start if not history else history[-1]['step']}) is "
                         f"kept in {work_dir}" if work_dir else "no checkpoint was written (no --work-dir)")
                raise TrainingDiverged(
                    f"QAT loss became NaN/Inf at step {step + 1} (slice {', '.join(bad) or '?'}); stopped before "
                    f"the update; {where}. Lower --lr (e.g. {cfg.lr / 4:g}) or check the model/data, and use a new "
                    "--work-dir.")
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            opt.step()
            total = float(sum(t.weight * v for t, v in zip(objective.terms, stats[:-1].tolist())))
            history.append({"step": step + 1, "lr": lr, "loss": total,
                            **{f"loss_int{t.bits}": float(v) for t, v in zip(objective.terms, stats[:-1].tolist())}})
            bar.set_postfix_str(f"loss {total:.4f}")
            done = step + 1
            if work_dir is not None and (done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0)):
                if d.main:
                    save_training_state(work_dir, done, params, opt, {
                        "version": STATE_VERSION, "fingerprint": fp, "history": history,
                        "tokens": done * global_batch * seqlen,
                        "rng": "torch.manual_seed(f(seed, step, rank)) at every step"})
                _barrier(d)
            if step_callback is not None:
                step_callback(done, model)
        seconds = time.time() - t0
        bar.close()
        qweights = {n: m.final() for n, m in layers.items()}
        weights = {n: m.weight.detach().float().cpu().clone() for n, m in layers.items()}
        return QATResult(qweights, history, cfg.steps, cfg.steps * global_batch * seqlen, seconds, start, weights)
    finally:
        del ddp
        for n, m in originals.items():
            set_submodule(model, n, m)
        model.to(orig_device)
        for n, p in model.named_parameters():
            p.requires_grad_(grad_flags.get(n, p.requires_grad))
        model.train(was_training)


QAT_ARG_NAMES = ("bits_list", "lambdas", "distill", "steps", "lr", "weight_decay", "warmup_steps", "min_lr_ratio",
                 "batch_size_train", "grad_accum", "max_grad_norm", "qparams", "seed", "save_every", "work_dir",
                 "device", "amp")


def make_config(**kw) -> QATConfig:
    cfg = QATConfig()
    mapping = {"batch_size_train": "batch_size"}
    for k, v in kw.items():
        if v is None and k != "work_dir":
            continue
        setattr(cfg, mapping.get(k, k), v)
    return cfg.validate()


def qat(model, targets: list[str], *, master_bits: int, group_size: int, symmetric: bool, param_dtype, slicing: str,
        calib: torch.Tensor, progress: bool = True, bits_list=None, lambdas=None, distill: str | None = None,
        step_callback=None, **kw) -> dict[str, QuantizedWeight]:
    """`quantize_model(model, "qat", calib=windows, bits_list=..., lambdas=..., distill=..., steps=..., ...)`."""
    unknown = sorted(set(kw) - set(QAT_ARG_NAMES))
    if unknown:
        raise ValueError(f"unknown QAT option(s) {unknown}; known: {', '.join(QAT_ARG_NAMES)}.")
    objective = build_objective(bits_list, lambdas, distill, master_bits=master_bits, slicing=slicing)
    cfg = make_config(**kw)
    res = train_qat(model, targets, calib, objective, cfg, group_size=group_size, symmetric=symmetric,
                    param_dtype=param_dtype, progress=progress, step_callback=step_callback)
    if progress and is_main_process():
        run_tokens = (res.steps - res.resumed_from) * res.tokens // res.steps
        tps = run_tokens / max(res.seconds, 1e-9)
        print(f"QAT {objective.describe()}: {res.steps} steps, {res.tokens} tokens, "
              f"final loss {res.history[-1]['loss']:.4f}, {tps:.1f} tokens/s this run")
    return res.qweights


__all__ = ["QATConfig", "QATResult", "FakeQuantLinear", "TrainingDiverged", "train_qat", "qat", "lr_at",
           "sample_indices", "init_distributed", "finish_distributed", "is_main_process", "make_config", "QAT_ARG_NAMES"]
