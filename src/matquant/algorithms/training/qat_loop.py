"""The end-to-end MatQuant QAT loop (`--method qat`):

    Σ_r λ_r · L_r(model whose targets are fake-quantized to the r-bit slice of the int-c master)

one forward + backward per slice r per micro-batch (L_r and co-distillation: `objective`). Trainable: only the
target weights (an fp32 master copy each, `fake_quant.FakeQuantLinear`); everything else, biases included, is
frozen. AdamW; linear warm-up then cosine decay to `min_lr_ratio·lr`; gradient clipping; gradient accumulation;
bf16 autocast on CUDA (fp32 master weights), fp32 on CPU. The global batch of step s is a pure function of
(seed, s) and the RNG is reseeded at every step from (seed, step, rank) (`qat_config`). Under torchrun the model is
wrapped in DistributedDataParallel (`shard='ddp'`) or sharded with FSDP2 (`shard='fsdp'`, `fsdp`: per decoder
block, then the root); each rank takes its share of every global batch; rank 0 writes checkpoints. Optionally each
decoder block recomputes its activations in backward (`activation_checkpointing`).

Checkpoints: every `save_every` steps and at the end, one unit ``step-XXXXXXXX`` of the work dir
(`workdir.WorkDir`: trainable tensors, AdamW state and the loss history in one atomically written file); older
ones are then removed. Rerunning the same command resumes from the newest one and ends bit-identical to an
uninterrupted run. A non-finite loss stops training (`diverged.TrainingDiverged`) before the optimiser step; the
last good checkpoint is kept. Output: final codes = MinMax round-half-up at the master bits of the trained weights
(`quantize_minmax`), or `quantize_codes` with the learned α, z.
"""
from __future__ import annotations

import math
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from matquant.algorithms.training.activation_checkpointing import activation_checkpointing, \
    check_activation_checkpointing
from matquant.algorithms.training.distributed import barrier, check_shard, init_distributed, pick_device
from matquant.algorithms.training.diverged import TrainingDiverged, check_finite_loss
from matquant.algorithms.training.fake_quant import FakeQuantLinear, set_layer_bits
from matquant.algorithms.training.fsdp import full_tensor, is_fsdp, like_param, shard_model, unshard_model
from matquant.algorithms.training.objective import Objective
from matquant.algorithms.training.qat_config import TrainingConfig, lr_at, per_process_batch, sample_indices, \
    step_seed
from matquant.algorithms.training.workdir import WorkDir, tensor_sha256
from matquant.models.targets import linear_weight
from matquant.nn.replace import set_submodule
from matquant.quant.minmax import QuantizedWeight, resolve_group_size

STEP_PREFIX = "step-"


def qat_settings(objective: Objective, cfg: TrainingConfig, targets, calib: torch.Tensor,
                 layers: dict[str, FakeQuantLinear], world: int) -> dict:
    """Everything that determines the result of a QAT run (the work dir's fingerprint)."""
    # (how the work is split or recomputed is not part of it: a run resumes under --shard ddp or fsdp alike)
    skip = ("save_every", "work_dir", "device", "extra", "global_batch", "shard", "activation_checkpointing")
    keep = {k: v for k, v in asdict(cfg).items() if k not in skip}
    return {"method": "qat", "objective": objective.to_dict(), "config": keep, "targets": list(targets),
            "world_size": world, "calib_shape": list(calib.shape), "calib_sha256": tensor_sha256(calib),
            "weights_sha256": tensor_sha256(*(m.weight for m in layers.values()))}


def save_training_state(wd: WorkDir | None, step: int, params: dict[str, nn.Parameter],
                        opt: torch.optim.Optimizer, state: dict) -> str:
    """Atomically write checkpoint `step` (one unit); older checkpoints are then removed. With FSDP every rank calls
    it (each sharded tensor is gathered whole, one at a time) and the rank passing `wd` (rank 0) keeps and writes;
    the other ranks pass None and hold one gathered tensor at a time."""
    name = f"{STEP_PREFIX}{step:08d}"
    sd = opt.state_dict()
    tensors, scalars = {}, {}

    def keep(key, t):
        t = full_tensor(t, t.device if not hasattr(t, "device_mesh") else "cpu")
        if wd is not None:
            tensors[key] = t

    for k, p in params.items():
        keep(f"param/{k}", p)
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                keep(f"opt/{idx}/{k}", v)
            else:
                scalars[f"{idx}/{k}"] = v
    if wd is None:
        return name
    wd.save(name, tensors, {**state, "step": step, "optimizer_param_groups": sd["param_groups"],
                            "optimizer_scalars": scalars})
    for old in wd.names(STEP_PREFIX):
        if old != name:
            wd.remove(old)
    return name


def latest_checkpoint(work_dir) -> Path | None:
    """The newest QAT checkpoint file in `work_dir` (None if there is none)."""
    files = sorted(p for p in Path(work_dir).glob(f"{STEP_PREFIX}*.safetensors") if not p.name.startswith("."))
    return files[-1] if files else None


def load_training_state(wd: WorkDir, name: str, params: dict[str, nn.Parameter], opt: torch.optim.Optimizer) -> dict:
    tensors, state = wd.load(name)
    missing = [k for k in params if f"param/{k}" not in tensors]
    if missing:
        raise ValueError(f"checkpoint {name} in {wd.path} lacks {missing[:3]}; delete {wd.path} to restart.")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(like_param(tensors[f"param/{k}"], p))
    opt_state: dict = {}
    plist = list(params.values())
    for key, v in tensors.items():
        if key.startswith("opt/"):
            _, idx, k = key.split("/", 2)
            # (a sharded parameter's moments go back as this rank's shard of them)
            opt_state.setdefault(int(idx), {})[k] = like_param(v, plist[int(idx)]) if int(idx) < len(plist) else v
    for key, v in state.get("optimizer_scalars", {}).items():
        idx, k = key.split("/", 1)
        opt_state.setdefault(int(idx), {})[k] = v
    groups = state["optimizer_param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": opt_state, "param_groups": groups})
    return state


def _unshard(model, layers: dict[str, FakeQuantLinear], originals: dict[str, nn.Module], device,
             gather: bool) -> None:
    """Undo FSDP; with `gather` the original target modules get the trained weights (in their own dtype)."""
    unshard_model(model, device, gather=gather)
    if gather:
        for n, m in originals.items():
            w = layers[n].weight.detach()
            m.weight = nn.Parameter((w.t() if type(m).__name__ == "Conv1D" else w).to(m.weight.dtype),
                                    requires_grad=False)


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


def train_qat(model, targets: list[str], calib: torch.Tensor, objective: Objective, cfg: TrainingConfig, *,
              group_size: int, symmetric: bool, param_dtype: torch.dtype, progress: bool = True,
              step_callback=None, clip: str = "minmax", importance: dict | None = None,
              clip_lambdas: tuple | None = None, keep_weights: bool = True) -> QATResult:
    """Run (or resume) QAT; returns the final codes and the loss history. See the module docstring.

    `keep_weights=False`: the result's `weights` is empty (the trained float weights are not kept beside the codes).
    Afterwards the model has its own modules back; under FSDP the target layers then hold their trained float
    weights (the untrained ones are not kept during training, to save memory)."""
    cfg.validate()
    if not torch.is_tensor(calib) or calib.dim() != 2 or calib.shape[1] < 2 or calib.shape[0] < 1 \
            or calib.dtype not in (torch.int64, torch.int32):
        raise ValueError("QAT needs training windows: an integer token-id tensor [n_windows, seqlen>=2].")
    calib = calib.long().cpu()
    d = init_distributed(cfg.device)
    fsdp = check_shard(cfg.shard, d.world) == "fsdp" and d.on
    per_rank = per_process_batch(cfg, d.world)
    if cfg.activation_checkpointing:
        check_activation_checkpointing(model)
    device = pick_device(cfg.device, d)
    use_amp = cfg.amp and device.type == "cuda"
    mods = dict(model.named_modules())
    originals = {n: mods[n] for n in targets}
    layers: dict[str, FakeQuantLinear] = {}
    for n, m in originals.items():
        w = linear_weight(m)
        gs = resolve_group_size(w.shape[1], group_size)
        ci = None if clip == "minmax" else dict(slices=objective.bits, lambdas=clip_lambdas or objective.lambdas,
                                                h=None if importance is None else importance[n].to(w.device))
        layers[n] = FakeQuantLinear(w, getattr(m, "bias", None), gs, objective.master_bits, symmetric,
                                    param_dtype, cfg.qparams, objective.slicing, clip_init=ci)
        layers[n]._forward_pre_hooks.update(m._forward_pre_hooks)  # e.g. quantize_model's input rotation
        if fsdp:  # qparams are cached by the weight's version; FSDP's gathered weight does not move it
            layers[n].cache_qparams = False
    if cfg.global_batch is not None:
        cfg = replace(cfg, batch_size=per_rank)
    settings = qat_settings(objective, cfg, targets, calib, layers, d.world)
    if clip != "minmax":  # (absent for MinMax, so work dirs of earlier versions still resume)
        settings["clip"] = clip
    if clip_lambdas is not None:
        settings["clip_lambdas"] = list(clip_lambdas)
    wd = None
    if cfg.work_dir:  # rank 0 creates (or checks) the work dir before the other ranks open it: no creation race
        if d.main:
            wd = WorkDir(cfg.work_dir, settings)
            wd.clean_temporaries()
        barrier(d)
        if not d.main:
            wd = WorkDir(cfg.work_dir, settings)

    was_training = model.training
    grad_flags = {n: p.requires_grad for n, p in model.named_parameters()}
    orig_device = next(model.parameters()).device
    for p in model.parameters():
        p.requires_grad_(False)
    for n, m in layers.items():
        set_submodule(model, n, m)
    if fsdp:  # the untrained weights are not kept while sharded: only their shape and dtype (restored: trained ones)
        for m in originals.values():
            m.weight = nn.Parameter(torch.empty_like(m.weight, device="meta"), requires_grad=False)
    ddp = None
    failed = None
    weights = {}
    stack = ExitStack()
    try:
        stack.enter_context(activation_checkpointing(model, cfg.activation_checkpointing))
        if fsdp:
            shard_model(model, device, d.world)
        else:
            model.to(device)
        params = {f"{name}.{k}": p for name, m in layers.items() for k, p in m.trainable().items()}
        opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        start, history = 0, []
        if wd is not None and wd.names(STEP_PREFIX):
            name = wd.names(STEP_PREFIX)[-1]
            state = load_training_state(wd, name, params, opt)
            start, history = state["step"], state["history"]
            if d.main and progress:
                print(f"QAT: resuming from {wd.path / name} (step {start}/{cfg.steps})")
        if d.on and not fsdp:
            ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                      broadcast_buffers=False)
        fwd = ddp if ddp is not None else model
        model.train()
        n_win, seqlen = calib.shape
        global_batch = per_rank * cfg.grad_accum * d.world
        t0 = time.time()
        bar = tqdm(range(start, cfg.steps), desc=f"QAT {objective.notation()}", disable=not (progress and d.main),
                   initial=start, total=cfg.steps)
        for step in bar:
            torch.manual_seed(step_seed(cfg.seed, step, d.rank))
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
                        set_layer_bits(layers, tb)
                        with torch.no_grad(), torch.autocast(device.type, torch.bfloat16, enabled=use_amp):
                            teacher_logits[tb] = fwd(input_ids=x, use_cache=False).logits[:, :-1].float()
                for i, term in enumerate(objective.terms):
                    last = micro == cfg.grad_accum - 1 and i == len(objective.terms) - 1
                    with (nullcontext() if ddp is None or last else ddp.no_sync()):
                        set_layer_bits(layers, term.bits)
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
                s = stats.to(device) if device.type == "cuda" else stats
                dist.all_reduce(s)
                stats = s.cpu()
                stats[:-1] /= d.world
            if stats[-1] > 0 or not torch.isfinite(stats[:-1]).all():
                bad = [(f"int{t.bits}", v) for t, v in zip(objective.terms, stats[:-1].tolist())
                       if not math.isfinite(v)]
                last_good = latest_checkpoint(wd.path) if wd is not None else None
                kept = (f"Stopped before the update; the last good checkpoint (step "
                        f"{int(last_good.stem[len(STEP_PREFIX):])}) is kept in {wd.path}." if last_good is not None
                        else "Stopped before the update; no checkpoint was written"
                        + (" yet." if wd is not None else " (no --work-dir)."))
                check_finite_loss(bad[0][1] if bad else float("nan"),
                                  f"QAT step {step + 1} (slice {', '.join(b for b, _ in bad) or '?'})", kept,
                                  f"a lower --lr (now {cfg.lr:g}; e.g. {cfg.lr / 4:g})")
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.max_grad_norm)
            opt.step()
            total = float(sum(t.weight * v for t, v in zip(objective.terms, stats[:-1].tolist())))
            history.append({"step": step + 1, "lr": lr, "loss": total,
                            **{f"loss_int{t.bits}": float(v) for t, v in zip(objective.terms, stats[:-1].tolist())}})
            bar.set_postfix_str(f"loss {total:.4f}")
            done = step + 1
            if wd is not None and (done == cfg.steps or (cfg.save_every and done % cfg.save_every == 0)):
                if d.main or fsdp:  # (FSDP: every rank takes part in gathering the sharded state)
                    save_training_state(wd if d.main else None, done, params, opt, {
                        "history": history, "tokens": done * global_batch * seqlen,
                        "rng": "torch.manual_seed(f(seed, step, rank)) at every step"})
                barrier(d)
            if step_callback is not None:
                step_callback(done, model)
        seconds = time.time() - t0
        bar.close()
        if fsdp:  # gather the whole model back, one tensor at a time
            del opt, params
            _unshard(model, layers, originals, orig_device, gather=True)
        qweights = {n: m.final() for n, m in layers.items()}
        if keep_weights:
            weights = {n: m.weight.detach().float().cpu().clone() for n, m in layers.items()}
        return QATResult(qweights, history, cfg.steps, cfg.steps * global_batch * seqlen, seconds, start, weights)
    except BaseException as e:
        failed = e
        raise
    finally:
        del ddp
        whole = True
        if fsdp and any(m.weight.is_meta for m in originals.values()):  # (an error before the end)
            # after an error the ranks may be out of step: gather only when every rank stopped at the same point
            # (a non-finite loss is all-reduced, so all ranks raise it together); otherwise the model is left
            # sharded (reload it)
            whole = not is_fsdp(model) or isinstance(failed, TrainingDiverged)
            _unshard(model, layers, originals, orig_device, gather=whole)
        stack.close()
        for n, m in originals.items():
            set_submodule(model, n, m)
        if whole:
            model.to(orig_device)
        for n, p in model.named_parameters():
            p.requires_grad_(grad_flags.get(n, p.requires_grad))
        model.train(was_training)
