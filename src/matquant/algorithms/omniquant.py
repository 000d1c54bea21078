"""OmniQuant + MatQuant: block-wise calibration of learnable weight clipping (LWC) and, optionally, a learnable
equivalent transformation (LET), trained so that every sliced precision r in R of ONE int-c master is accurate.

Per transformer block, in sequence (only one block's weights, its learnable parameters and the block's
input/output activations are worked on at a time):

* Base weights W are frozen. LWC learns γ, β ∈ (0, 1) per output channel and group (sigmoid of a logit, initialised
  at logit 4 → 0.982 as in OmniQuant): α = (γ·max − β·min)/(2^c − 1), z = −β·min/α (symmetric: α = γ·absmax/(2^(c−1)−1)).
* LET (``let=True``; Llama-style blocks only): a per-channel scale s on the input of gate_proj/up_proj, folded into
  ``post_attention_layernorm`` (norm weight g → g/s, W_gate/up → W·diag(s)), and a per-channel scale on the input of
  down_proj folded into up_proj's output rows (W_up rows / s2, W_down columns · s2), which is exact because
  act(gate)·up is linear in up. With attention in scope, s3 on input_layernorm → q/k/v. OmniQuant's *shift* δ is
  not used: RMSNorm and Llama's linears have no bias, so a shift cannot be folded into the checkpoint.
  s is initialised SmoothQuant-style, s = sqrt(max|x| / max|W|) per input channel, from the block's calibration inputs.
* Loss: Σ_r λ_r · mean_{teachers of r} MSE(teacher, F_block(S(Q(W), r), X_r)) with STE through every rounding.
  The teacher is the full-precision block output (``fp``) and/or, for co-distillation, the int-t slice's block
  output (stop-gradient). Specs in the paper's notation: ``[8,4,2]``, ``[8,4,8->2]`` (int2 learns from int8 only),
  ``[8,4,2,8->2]`` (int2 from fp and int8, equal weight), ``[8,4,2,8->4;2]``.
* Block inputs (``block_inputs``): ``quant`` (default, as OmniQuant): the slice-r student sees the output of the
  already-quantized previous blocks *at precision r* (one activation stream per r), the target is the fp block on
  fp inputs. ``fp``: every student sees the fp inputs (one stream; cheaper, ignores error accumulation).
* After a block is trained its final master codes are computed with ``quantize_codes`` (round-half-up) from the
  learned α, z rounded to the storage dtype first; the streams are propagated through the real quantized block.

Resume: with ``work_dir``, each finished block is written atomically (``block_XXX.safetensors`` + ``state.json``);
rerunning the same command skips finished blocks (their inputs are recomputed by forward passes) and ends with an
identical result, because each block's randomness is seeded from (seed, block index).
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save as st_save
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from matquant.format.atomic import atomic_write_bytes, atomic_write_json
from matquant.models.targets import linear_weight
from matquant.quant.minmax import (
    QuantizedWeight, check_bits, dequantize_codes, grouped, quantize_codes, resolve_group_size,
)
from matquant.quant.slicing import check_slicing, slice_master
from matquant.quant.ste import fake_quant_ste

DEFAULT_LR = 1e-3  # MatQuant paper: AdamW, constant lr 1e-3
DEFAULT_LR_LWC = 2e-1  # OmniQuant uses 1e-2 with ~40x more steps; see docs/omniquant.md
LWC_INIT = 4.0  # sigmoid(4) = 0.982, OmniQuant's initial clipping factor
BLOCK_INPUTS = ("quant", "fp")
LOSS_BALANCE = ("none", "initial")


# ----------------------------------------------------------------------------------------------------------------
# Loss spec: R, λ and co-distillation terms
# ----------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OmniSpec:
    """students: the trained precisions R (descending); lambdas[r]; teachers[r]: tuple of 'fp' or int bits."""

    students: tuple[int, ...]
    lambdas: dict[int, float]
    teachers: dict[int, tuple]

    def needed(self) -> tuple[int, ...]:
        """Every precision whose block output is needed (students and teacher slices), descending."""
        t = {x for ts in self.teachers.values() for x in ts if x != "fp"}
        return tuple(sorted(set(self.students) | t, reverse=True))

    def describe(self) -> str:
        return ", ".join(f"int{r}: λ={self.lambdas[r]:g} ← " + "+".join(
            "fp" if t == "fp" else f"int{t}" for t in self.teachers[r]) for r in self.students)


def parse_distill(spec: str) -> dict[int, list]:
    """Parse '[8,4,2,8->2]' / '[8,4,8->4;2]' into {student bits: [teachers]} ('fp' = ground truth)."""
    s = spec.strip().replace("→", "->").replace(" ", "")
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
    if not s:
        raise ValueError(f"empty co-distillation spec {spec!r}; use e.g. '[8,4,2]' or '[8,4,2,8->2]'.")
    teachers: dict[int, list] = {}
    for item in s.split(","):
        m = re.fullmatch(r"(\d+)(?:->(\d+(?:;\d+)*))?", item)
        if not m:
            raise ValueError(f"bad item {item!r} in co-distillation spec {spec!r}: each item is a bit-width 'r' "
                             "(learn from the full-precision output) or 't->r' / 't->r1;r2' (int-t slice teaches "
                             "int-r), e.g. '[8,4,2,8->2]'.")
        if m.group(2) is None:
            teachers.setdefault(_bits(m.group(1), spec), []).append("fp")
            continue
        t = _bits(m.group(1), spec)
        for r_s in m.group(2).split(";"):
            r = _bits(r_s, spec)
            if r >= t:
                raise ValueError(f"in {spec!r}: the teacher must have more bits than its student ({t}->{r}).")
            teachers.setdefault(r, []).append(t)
    for r, ts in teachers.items():
        if len(set(ts)) != len(ts):
            raise ValueError(f"in {spec!r}: int{r} lists the same teacher twice.")
    return teachers


def _bits(x: str, spec: str) -> int:
    b = int(x)
    if not 1 <= b <= 8:
        raise ValueError(f"bit-width {b} in {spec!r} is outside 1..8.")
    return b


def default_lambdas(students) -> dict[int, float]:
    """Paper default (0.1, 0.1, 1.0) for (8, 4, 2): weight 1 on the lowest precision, 0.1 on the others."""
    lo = min(students)
    return {r: (1.0 if r == lo else 0.1) for r in students}


def make_spec(master_bits: int, bits_list=None, lambdas=None, distill: str | None = None) -> OmniSpec:
    """Validate R / λ / co-distillation spec (raises ValueError before any work)."""
    check_bits(master_bits, "master bits")
    if distill:
        teachers = parse_distill(distill)
        students = sorted(teachers, reverse=True)
        if bits_list is not None and sorted(set(bits_list), reverse=True) != students:
            raise ValueError(f"--bits-list {list(bits_list)} disagrees with the precisions of --distill {distill!r} "
                             f"({students}); give only one of them.")
    else:
        if bits_list is None:
            bits_list = [b for b in (8, 4, 2) if b <= master_bits]
        bits_list = list(bits_list)
        if not bits_list:
            raise ValueError("--bits-list is empty; give the trained precisions, e.g. 8,4,2.")
        if len(set(bits_list)) != len(bits_list):
            raise ValueError(f"--bits-list {bits_list} repeats a bit-width.")
        for b in bits_list:
            check_bits(b, "each of --bits-list")
        students = sorted(bits_list, reverse=True)
        teachers = {r: ["fp"] for r in students}
    too_high = [b for b in students + [t for ts in teachers.values() for t in ts if t != "fp"] if b > master_bits]
    if too_high:
        raise ValueError(f"precision(s) {sorted(set(too_high))} exceed the master bits {master_bits}: raise "
                         "--bits-master or drop them from --bits-list/--distill.")
    if lambdas is None:
        lam = default_lambdas(students)
    else:
        lambdas = [float(x) for x in lambdas]
        order = students if distill else list(bits_list)
        if len(lambdas) != len(order):
            raise ValueError(f"--lambdas has {len(lambdas)} value(s) but there are {len(order)} trained precisions "
                             f"{order}; give one λ per precision, in that order.")
        if any(not math.isfinite(x) or x < 0 for x in lambdas) or sum(lambdas) <= 0:
            raise ValueError(f"--lambdas {lambdas} must be finite, >= 0 and not all zero.")
        lam = dict(zip(order, lambdas))
    return OmniSpec(tuple(students), lam, {r: tuple(teachers[r]) for r in students})


# ----------------------------------------------------------------------------------------------------------------
# Blocks: discovery, input capture
# ----------------------------------------------------------------------------------------------------------------
_BLOCK_RX = re.compile(r"^(.*\.(?:layers|h|layer|blocks))\.(\d+)\.(.+)$")


def _block_layout(model, targets):
    """(ModuleList name, {block index: [relative target names]})."""
    lists, per_block = set(), {}
    for t in targets:
        m = _BLOCK_RX.match(t)
        if not m:
            raise ValueError(f"omniquant trains transformer blocks, but target {t!r} is not inside a numbered block "
                             "(…layers.N…); choose targets inside the blocks (--scope / --modules).")
        lists.add(m.group(1))
        per_block.setdefault(int(m.group(2)), []).append(m.group(3))
    if len(lists) != 1:
        raise ValueError(f"targets span several block lists {sorted(lists)}; quantize one of them at a time.")
    return lists.pop(), per_block


class NonFiniteLossError(FloatingPointError, ValueError):
    """The block loss became NaN/Inf; finished blocks stay in the work dir."""


class _Stop(Exception):
    pass


@torch.no_grad()
def _capture_inputs(model, blocks: nn.ModuleList, calib: torch.Tensor):
    """Hidden states entering block 0 for every window ([n, 1, seq, hidden]) and the block's other arguments."""
    xs, extra = [], {}

    def hook(_mod, args, kwargs):
        xs.append(args[0] if args else kwargs["hidden_states"])
        if not extra:
            extra["args"] = args[1:]
            extra["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _Stop

    h = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(calib.shape[0]):
            try:
                model(input_ids=calib[i: i + 1], use_cache=False)
            except _Stop:
                pass
    finally:
        h.remove()
    kw = extra["kwargs"]
    for k in ("past_key_values", "past_key_value", "layer_past"):
        if k in kw:
            kw[k] = None
    if "use_cache" in kw:
        kw["use_cache"] = False
    return torch.cat(xs).unsqueeze(1), extra["args"], kw


def _run(block, params: dict, x, args, kwargs):
    out = functional_call(block, params, (x, *args), kwargs, strict=False)
    return out[0] if isinstance(out, (tuple, list)) else out


# ----------------------------------------------------------------------------------------------------------------
# LWC / LET parametrisation of one block
# ----------------------------------------------------------------------------------------------------------------
class _BlockQuant(nn.Module):
    """Learnable parameters of one block and the map from them to (effective weights, α, z, extra overrides)."""

    def __init__(self, block, rel_targets, master_bits, group_size, symmetric, let, block_x=None):
        super().__init__()
        self.__dict__["block"] = block  # not a submodule: its weights are frozen and not ours
        self.targets, self.c, self.symmetric = list(rel_targets), master_bits, symmetric
        self.names = {t: t.replace(".", "__") for t in self.targets}
        self.gs = {}
        self.up, self.low = nn.ParameterDict(), nn.ParameterDict()
        for t in self.targets:
            out_f, in_f = linear_weight(block.get_submodule(t)).shape
            gs = resolve_group_size(in_f, group_size)
            self.gs[t] = gs
            shape = (out_f, in_f // gs)
            self.up[self.names[t]] = nn.Parameter(torch.full(shape, LWC_INIT))
            if not symmetric:
                self.low[self.names[t]] = nn.Parameter(torch.full(shape, LWC_INIT))
        self.lets = let_pairs(block, self.targets) if let else []
        self.let_scales = nn.ParameterList()
        for kind, src, dsts in self.lets:
            self.let_scales.append(nn.Parameter(_smooth_init(block, src, dsts, kind, block_x)))

    def effective(self) -> tuple[dict, dict]:
        """({rel target: effective [out, in] fp weight}, {param name: override tensor} for non-target tensors)."""
        w = {t: linear_weight(self.block.get_submodule(t)).detach() for t in self.targets}
        over = {}
        for (kind, src, dsts), s in zip(self.lets, self.let_scales):
            s = s.clamp_min(1e-5)
            if kind == "norm":
                g = self.block.get_submodule(src).weight.detach()
                over[f"{src}.weight"] = g / s
            else:  # linear src: output rows / s
                w[src] = w.get(src, linear_weight(self.block.get_submodule(src)).detach()) / s.unsqueeze(1)
            for d in dsts:
                w[d] = w.get(d, linear_weight(self.block.get_submodule(d)).detach()) * s.unsqueeze(0)
        return w, over

    def qparams(self, t: str, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = grouped(w, self.gs[t])
        gamma = torch.sigmoid(self.up[self.names[t]])
        if self.symmetric:
            half = 2 ** (self.c - 1)
            scale = (gamma * g.abs().amax(-1) / max(half - 1, 1)).clamp_min(1e-8)
            return scale, torch.full_like(scale, float(half))
        beta = torch.sigmoid(self.low[self.names[t]])
        hi, lo = gamma * g.amax(-1), beta * g.amin(-1)
        scale = ((hi - lo) / (2**self.c - 1)).clamp_min(1e-8)
        return scale, -lo / scale

    def fake_params(self, r: int, mode: str) -> dict:
        """functional_call overrides for the block at slice r (differentiable, STE)."""
        w, over = self.effective()
        params = dict(over)
        for t in self.targets:
            scale, zero = self.qparams(t, w[t])
            params[f"{t}.weight"] = _as_param(self.block, t, fake_quant_ste(w[t], scale, zero, self.c, r, mode))
        for n, wt in w.items():  # LET-touched non-target linears keep fp weights
            if n not in self.targets:
                params[f"{n}.weight"] = _as_param(self.block, n, wt)
        return params

    @torch.no_grad()
    def finalize(self, param_dtype) -> tuple[dict, dict]:
        """({rel target: QuantizedWeight}, {param name: new fp tensor to write into the block})."""
        w, over = self.effective()
        qws = {}
        for t in self.targets:
            scale, zero = self.qparams(t, w[t])
            scale, zero = scale.to(param_dtype), zero.to(param_dtype)
            qws[t] = QuantizedWeight(quantize_codes(w[t], scale, zero, self.c), scale, zero, self.c, self.gs[t])
        fp = {k: v.clone() for k, v in over.items()}
        for n, wt in w.items():
            if n not in self.targets:
                fp[f"{n}.weight"] = _as_param(self.block, n, wt).clone()
        return qws, fp


def _as_param(block, name, w):
    """Back from [out, in] to the module's own weight layout (Conv1D stores [in, out])."""
    return w.t() if type(block.get_submodule(name)).__name__ == "Conv1D" else w


def let_pairs(block, targets) -> list[tuple[str, str, list[str]]]:
    """LET foldings available in this block: (kind, source, [consumer linears]) — Llama-style names only."""
    names = dict(block.named_modules())
    pairs = []
    mlp_in = [n for n in ("mlp.gate_proj", "mlp.up_proj") if n in names]
    if "post_attention_layernorm" in names and mlp_in and any(t in targets for t in mlp_in):
        pairs.append(("norm", "post_attention_layernorm", mlp_in))
    if "mlp.up_proj" in names and "mlp.down_proj" in names and \
            any(t in targets for t in ("mlp.up_proj", "mlp.down_proj")):
        pairs.append(("linear", "mlp.up_proj", ["mlp.down_proj"]))
    attn_in = [n for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj") if n in names]
    if "input_layernorm" in names and len(attn_in) == 3 and any(t in targets for t in attn_in):
        pairs.append(("norm", "input_layernorm", attn_in))
    bad = [p for p in pairs if p[0] == "norm" and getattr(names[p[1]], "bias", None) is not None]
    if bad or (not pairs):
        raise ValueError("LET (--let) supports Llama-style blocks (RMSNorm → gate/up, up → down, RMSNorm → q/k/v); "
                         "this block has none of them. Run without --let (LWC only).")
    return pairs


@torch.no_grad()
def _smooth_init(block, src, dsts, kind, xs) -> torch.Tensor:
    """SmoothQuant-style initial scale sqrt(max|x| / max|W|) per channel, from the block's calibration inputs."""
    wmax = torch.stack([linear_weight(block.get_submodule(d)).abs().amax(0) for d in dsts]).amax(0)
    if xs is None:
        return torch.ones_like(wmax)
    amax = torch.zeros_like(wmax)
    mod = block.get_submodule(dsts[0])

    def hook(_m, inp):
        amax.copy_(torch.maximum(amax, inp[0].detach().abs().flatten(0, -2).amax(0)))

    h = mod.register_forward_pre_hook(hook)
    try:
        x, args, kwargs = xs
        for i in range(x.shape[0]):
            _run(block, {}, x[i], args, kwargs)
    finally:
        h.remove()
    return (amax.clamp_min(1e-5).sqrt() / wmax.clamp_min(1e-5).sqrt()).clamp(1e-2, 1e2)


# ----------------------------------------------------------------------------------------------------------------
# Resume state
# ----------------------------------------------------------------------------------------------------------------
def _fingerprint(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


class _WorkDir:
    def __init__(self, path, settings: dict):
        self.path = Path(path) if path else None
        self.fp = _fingerprint(settings)
        self.settings = settings
        if self.path is None:
            return
        state = self.path / "state.json"
        if state.exists():
            try:
                st = json.loads(state.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{state} is corrupt ({e}); delete {self.path} to start over.") from None
            if st.get("fingerprint") != self.fp:
                saved = json.loads(json.dumps(st.get("settings") or {}, default=str))
                now = json.loads(json.dumps(settings, default=str))
                diff = [f"{k}: {saved.get(k)!r} there, {now.get(k)!r} now" for k in sorted(set(saved) | set(now))
                        if saved.get(k) != now.get(k)]
                if len(diff) > 4:
                    diff = diff[:4] + [f"... {len(diff) - 4} more"]
                raise ValueError(f"work dir {self.path} holds a run with different settings ("
                                 f"{'; '.join(d if len(d) < 200 else d[:200] + '...' for d in diff) or 'fingerprint'}"
                                 f"); use another --work-dir or delete it to start over.")
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_json(state, {"fingerprint": self.fp, "settings": settings, "done": {}})

    def done(self, i: int) -> bool:
        return self.path is not None and (self.path / f"block_{i:03d}.safetensors").exists() and \
            str(i) in json.loads((self.path / "state.json").read_text())["done"]

    def save(self, i: int, qws: dict, fp: dict, info: dict) -> None:
        if self.path is None:
            return
        tensors, meta = {}, {}
        for t, q in qws.items():
            tensors[f"q/{t}/codes"], tensors[f"q/{t}/scales"], tensors[f"q/{t}/zeros"] = q.codes, q.scales, q.zeros
            meta[t] = [q.bits, q.group_size]
        for k, v in fp.items():
            tensors[f"fp/{k}"] = v.contiguous()
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        atomic_write_bytes(self.path / f"block_{i:03d}.safetensors", st_save(tensors, metadata={"q": json.dumps(meta)}))
        st = json.loads((self.path / "state.json").read_text())
        st["done"][str(i)] = info
        atomic_write_json(self.path / "state.json", st)

    def load(self, i: int) -> tuple[dict, dict]:
        from safetensors import safe_open

        f = self.path / f"block_{i:03d}.safetensors"
        with safe_open(str(f), framework="pt") as h:
            meta = json.loads(h.metadata()["q"])
        tensors = load_file(str(f))
        qws = {t: QuantizedWeight(tensors[f"q/{t}/codes"], tensors[f"q/{t}/scales"], tensors[f"q/{t}/zeros"], b, gs)
               for t, (b, gs) in meta.items()}
        fp = {k[3:]: v for k, v in tensors.items() if k.startswith("fp/")}
        return qws, fp


# ----------------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------------
def omniquant(
    model, targets: list[str], *, master_bits: int, group_size: int, symmetric: bool, param_dtype, slicing: str,
    calib: torch.Tensor, progress: bool = True, bits_list=None, lambdas=None, distill: str | None = None,
    epochs: int = 2, lr: float = DEFAULT_LR, lr_lwc: float | None = DEFAULT_LR_LWC, lr_let: float | None = None,
    weight_decay: float = 0.0, let: bool = False, block_inputs: str = "quant", loss_balance: str = "none",
    work_dir=None, seed: int = 0, device: str = "cpu", _crash_after_block: int | None = None, **_,
) -> dict[str, QuantizedWeight]:
    spec = make_spec(master_bits, bits_list, lambdas, distill)
    check_slicing(slicing)
    lr_lwc = DEFAULT_LR_LWC if lr_lwc is None else lr_lwc
    if block_inputs not in BLOCK_INPUTS:
        raise ValueError(f"block_inputs must be one of {BLOCK_INPUTS}, got {block_inputs!r}.")
    if loss_balance not in LOSS_BALANCE:
        raise ValueError(f"--loss-balance must be one of {LOSS_BALANCE}, got {loss_balance!r}.")
    if not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"--epochs must be a non-negative integer, got {epochs!r}.")
    for name, v in (("--lr", lr), ("--lr-lwc", lr_lwc), ("--lr-let", lr_let)):
        if v is not None and not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive number, got {v!r}.")
    if calib is None or calib.dim() != 2 or calib.shape[0] < 1:
        raise ValueError("omniquant needs calibration windows: a LongTensor [n_windows, seqlen].")
    list_name, per_block = _block_layout(model, targets)
    blocks = model.get_submodule(list_name)
    settings = dict(targets=targets, master_bits=master_bits, group_size=group_size, symmetric=symmetric,
                    param_dtype=str(param_dtype), slicing=slicing, spec=spec.describe(), epochs=epochs, lr=lr,
                    lr_lwc=lr_lwc, lr_let=lr_let, weight_decay=weight_decay, let=let, block_inputs=block_inputs,
                    seed=seed, calib=_fingerprint(calib.tolist()), calib_shape=list(calib.shape))
    if loss_balance != "none":  # only when set, so work dirs made before the option existed still resume
        settings["loss_balance"] = loss_balance
    wd = _WorkDir(work_dir, settings)
    for p in model.parameters():
        p.requires_grad_(False)
    dev = torch.device(device)
    print(f"omniquant: {len(targets)} layers in {len(per_block)} blocks; {spec.describe()}; "
          f"{calib.shape[0]}×{calib.shape[1]} tokens × {epochs} epochs; inputs={block_inputs}; slicing={slicing}"
          + ("; LET" if let else ""), flush=True) if progress else None

    x0, args, kwargs = _capture_inputs(model, blocks, calib)
    args = tuple(a.to(dev) if torch.is_tensor(a) else a for a in args)
    kwargs = {k: (v.to(dev) if torch.is_tensor(v) else tuple(t.to(dev) for t in v) if isinstance(v, tuple) and
                  all(torch.is_tensor(t) for t in v) else v) for k, v in kwargs.items()}
    x0 = x0.to(dev)
    quant_streams = spec.needed() if block_inputs == "quant" else ()
    streams = {"fp": x0, **{r: x0.clone() for r in quant_streams}}
    result: dict[str, QuantizedWeight] = {}
    last = max(per_block)
    for i in range(last + 1):
        block = blocks[i].to(dev)
        # fp target: the unmodified block on fp inputs (also the next fp input)
        with torch.no_grad():
            y_fp = torch.stack([_run(block, {}, x, args, kwargs) for x in streams["fp"]])
        if i in per_block:
            if wd.done(i):
                qws, fp = wd.load(i)
                desc = f"block {i}: resumed from {wd.path}"
                print(desc, flush=True) if progress else None
            else:
                t0 = time.time()
                qws, fp, info = _train_block(block, per_block[i], spec, streams, y_fp, args, kwargs, i, epochs, lr,
                                             lr_lwc, lr_let, weight_decay, let, master_bits, group_size, symmetric,
                                             param_dtype, slicing, seed, progress, dev, loss_balance)
                info["seconds"] = round(time.time() - t0, 2)
                qws = {t: QuantizedWeight(q.codes.cpu(), q.scales.cpu(), q.zeros.cpu(), q.bits, q.group_size)
                       for t, q in qws.items()}
                fp = {k: v.cpu() for k, v in fp.items()}
                wd.save(i, qws, fp, info)
            # apply: LET-modified fp tensors into the model, quantized weights for the propagation
            with torch.no_grad():
                for k, v in fp.items():
                    p = block.get_parameter(k)
                    p.copy_(v.to(p.dtype))
            for t, q in qws.items():
                result[f"{list_name}.{i}.{t}"] = q
            with torch.no_grad():
                for r in quant_streams:
                    params = {f"{t}.weight": _as_param(block, t, dequantize_codes(
                        slice_master(q.codes.to(dev), q.bits, r, slicing), q.scales.to(dev), q.zeros.to(dev)))
                        for t, q in qws.items()}
                    streams[r] = torch.stack([_run(block, params, x, args, kwargs) for x in streams[r]])
        else:
            with torch.no_grad():
                for r in quant_streams:
                    streams[r] = torch.stack([_run(block, {}, x, args, kwargs) for x in streams[r]])
        streams["fp"] = y_fp
        blocks[i].to("cpu")
        if _crash_after_block is not None and i == _crash_after_block:
            raise RuntimeError(f"simulated crash after block {i}")
    return result


def _train_block(block, rel_targets, spec: OmniSpec, streams, y_fp, args, kwargs, idx, epochs, lr, lr_lwc, lr_let,
                 weight_decay, let, c, group_size, symmetric, param_dtype, slicing, seed, progress, dev,
                 loss_balance="none"):
    torch.manual_seed(seed * 100003 + idx)
    bq = _BlockQuant(block, rel_targets, c, group_size, symmetric, let,
                     block_x=(streams["fp"], args, kwargs) if let else None).to(dev)
    groups = [{"params": list(bq.up.values()) + list(bq.low.values()), "lr": lr_lwc}]
    if let:
        groups.append({"params": list(bq.let_scales), "lr": lr_let or lr})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, eps=1e-12)
    n = y_fp.shape[0]
    # MSE relative to the block output's mean square: same optimum, but the loss is O(1) whatever the activation
    # scale, so AdamW's eps never swamps the (tiny) gradients of small or randomly initialised models
    norm = y_fp.float().pow(2).mean().clamp_min(1e-30)
    gen = torch.Generator().manual_seed(seed * 100003 + idx)
    needed = spec.needed()
    teacher_bits = {t for ts in spec.teachers.values() for t in ts if t != "fp"}
    first = last = None

    def slice_losses(j):
        """(r, unweighted loss) for each student r on window j: relative MSE to its teachers, averaged. A generator,
        so a backward on one slice's loss frees its graph before the next slice is computed."""
        outs = {}
        for r in needed:  # descending: int-t teachers are computed before their students
            x = streams[r][j] if r in streams else streams["fp"][j]
            if r not in spec.students:
                with torch.no_grad():
                    outs[r] = _run(block, bq.fake_params(r, slicing), x, args, kwargs)
                continue
            y = _run(block, bq.fake_params(r, slicing), x, args, kwargs)
            if r in teacher_bits:
                outs[r] = y.detach()
            ts = spec.teachers[r]
            yield r, sum(F.mse_loss(y, y_fp[j] if t == "fp" else outs[t]) for t in ts) / len(ts) / norm

    # loss balance: 'none' = the paper's Σ λ_r·loss_r; 'initial' divides each loss_r by its value at the starting
    # (MinMax) clipping, so λ_r weights relative improvement and the large int2 error does not drown int8's
    base = {r: 1.0 for r in spec.students}
    if loss_balance == "initial" and epochs > 0:
        sums = {r: 0.0 for r in spec.students}
        with torch.no_grad():
            for j in range(n):
                for r, v in slice_losses(j):
                    sums[r] += v.item()
        base = {r: max(sums[r] / n, 1e-12) for r in spec.students}
    bar = tqdm(total=epochs * n, desc=f"block {idx}", disable=not progress, leave=False)
    for ep in range(epochs):
        tot = 0.0
        for j in torch.randperm(n, generator=gen).tolist():
            opt.zero_grad(set_to_none=True)
            step = 0.0
            for r, loss in slice_losses(j):
                loss = spec.lambdas[r] * loss / base[r]
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(
                        f"omniquant: non-finite loss ({loss.item()}) in block {idx}, epoch {ep}, int{r}. "
                        "Blocks finished before this one are kept in --work-dir; lower --lr (or --lr-lwc/--lr-let) "
                        "and rerun the same command to resume.")
                loss.backward()
                step += loss.item()
            opt.step()
            tot += step
            bar.update(1)
            bar.set_postfix(loss=f"{step:.3g}")
        mean = tot / max(n, 1)
        first = mean if first is None else first
        last = mean
    bar.close()
    qws, fp = bq.finalize(param_dtype)
    if progress:
        tqdm.write(f"block {idx}: loss {first if first is not None else float('nan'):.4g} -> "
                   f"{last if last is not None else float('nan'):.4g}")
    return qws, fp, {"first_epoch_loss": first, "last_epoch_loss": last}


# CPU-friendly calibration defaults used by the CLI when --calib-windows / --calib-seqlen are not given
omniquant.calib_defaults = (8, 256)  # the configuration measured in docs/results.md


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
def add_omniquant_args(p) -> None:
    g = p.add_argument_group("omniquant (--method omniquant; also --bits-list, --lambdas, --distill, --lr, --seed, "
                             "--work-dir)")
    g.add_argument("--epochs", type=int, default=2, help="passes over the calibration windows per block (default 2)")
    g.add_argument("--lr-lwc", type=float, default=None, help=f"learning rate of the clipping logits (default {DEFAULT_LR_LWC:g}; see docs/omniquant.md)")
    g.add_argument("--lr-let", type=float, default=None, help="learning rate of the LET scales (default --lr)")
    g.add_argument("--let", action="store_true",
                   help="also learn the equivalent transformation (Llama-style blocks: norm → gate/up, up → down)")
    g.add_argument("--loss-balance", default="none", choices=LOSS_BALANCE,
                   help="none: the paper's sum of lambda_r * loss_r; initial: each loss_r divided by its value at the "
                        "starting (MinMax) clipping, so lambda weights relative improvement and int2's large error "
                        "does not drown int8's (a deviation; see docs/omniquant.md) (default none)")
    g.add_argument("--block-inputs", default="quant", choices=BLOCK_INPUTS,
                   help="quant: each slice sees the quantized previous blocks' output at its precision (OmniQuant); "
                        "fp: every slice sees the full-precision inputs (default quant)")


def omniquant_kwargs(args) -> dict:
    if getattr(args, "method", None) != "omniquant":
        return {}
    kw = dict(bits_list=args.bits_list, lambdas=args.lambdas, distill=args.distill, epochs=args.epochs,
              lr=args.lr if args.lr is not None else DEFAULT_LR, lr_lwc=args.lr_lwc, lr_let=args.lr_let, let=args.let,
              block_inputs=args.block_inputs, loss_balance=args.loss_balance, work_dir=args.work_dir,
              seed=args.seed if args.seed is not None else 0)
    make_spec(args.bits_master, kw["bits_list"], kw["lambdas"], kw["distill"])  # fail before loading the model
    return {k: v for k, v in kw.items() if v is not None}
