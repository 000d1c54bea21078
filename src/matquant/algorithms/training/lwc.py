"""Learnable weight clipping (LWC) and learnable equivalent transformation (LET) of one transformer block:
the parameters OmniQuant trains, and the map from them to the block's effective (fake-quantized) weights.

* LWC learns γ, β ∈ (0, 1) per output channel and group (sigmoid of a logit, initialised at logit 4 → 0.982 as in
  OmniQuant): α = (γ·max − β·min)/(2^c − 1), z = −β·min/α (symmetric: α = γ·absmax/(2^(c−1)−1)). With a clipping
  search (`clip`, quant/clip_search.py) the ends are γ·k_hi·max and β·k_lo·min with fixed per-group k = (searched
  factor)/sigmoid(4), so training starts exactly at the searched range (and may widen it by at most 1.8 %).
* LET (Llama-style blocks only): a per-channel scale s on the input of gate_proj/up_proj, folded into
  ``post_attention_layernorm`` (norm weight g → g/s, W_gate/up → W·diag(s)), and a per-channel scale on the input
  of down_proj folded into up_proj's output rows (W_up rows / s2, W_down columns · s2), which is exact because
  act(gate)·up is linear in up. With attention in scope, s3 on input_layernorm → q/k/v. s is initialised
  SmoothQuant-style, s = sqrt(max|x| / max|W|) per input channel, from the block's calibration inputs.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from matquant.models.targets import linear_weight
from matquant.quant.clip_search import clip_search
from matquant.quant.minmax import QuantizedWeight, grouped, param_limits, quantize_codes, resolve_group_size
from matquant.quant.ste import fake_quant_ste

LWC_INIT = 4.0  # sigmoid(4) = 0.982, OmniQuant's initial clipping factor


def run_block(block, params: dict, x, args, kwargs):
    """Forward `block` on hidden states x with `params` overriding some of its tensors (differentiable)."""
    out = functional_call(block, params, (x, *args), kwargs, strict=False)
    return out[0] if isinstance(out, (tuple, list)) else out


class BlockQuant(nn.Module):
    """Learnable parameters of one block and the map from them to (effective weights, α, z, extra overrides)."""

    def __init__(self, block, rel_targets, master_bits, group_size, symmetric, let, block_x=None, clip=None):
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
            self.let_scales.append(nn.Parameter(smooth_init(block, src, dsts, kind, block_x)))
        self.clip_k = {}  # {rel target: (k_lo, k_hi)} factors on min / max; empty = MinMax start
        if clip is not None:
            self._init_clip(**clip)

    @torch.no_grad()
    def _init_clip(self, slices, lambdas, slicing, param_dtype, importance=None):
        """Start the clipping at the searched range of the initial effective weights (inputs x/s under LET: h/s²)."""
        w, _ = self.effective()
        h = {t: None if importance is None else importance[t].float().clone() for t in self.targets}
        for (_kind, _src, dsts), s in zip(self.lets, self.let_scales):
            for d in dsts:
                if d in h and h[d] is not None:
                    h[d] = h[d] / s.detach().float().pow(2).cpu()
        base = torch.sigmoid(torch.tensor(LWC_INIT)).item()
        for t in self.targets:
            hv = None if h[t] is None else h[t].to(w[t].device)
            r = clip_search(w[t].float(), hv, bits=self.c, group_size=self.gs[t], symmetric=self.symmetric,
                            slicing=slicing, slices=slices, lambdas=lambdas, param_dtype=param_dtype)
            self.clip_k[t] = (r.lo_factor / base, r.hi_factor / base)

    def _apply(self, fn, *args, **kwargs):  # .to(device) moves the clipping factors too
        out = super()._apply(fn, *args, **kwargs)
        self.clip_k = {t: (fn(lo), fn(hi)) for t, (lo, hi) in self.clip_k.items()}
        return out

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
        if t in self.clip_k:  # start at the searched range (see the module docstring)
            k_lo, k_hi = self.clip_k[t]
            gamma = gamma * k_hi
        if self.symmetric:
            half = 2 ** (self.c - 1)
            scale = (gamma * g.abs().amax(-1) / max(half - 1, 1)).clamp_min(1e-8)
            return scale, torch.full_like(scale, float(half))
        beta = torch.sigmoid(self.low[self.names[t]])
        if t in self.clip_k:
            beta = beta * k_lo
        hi, lo = gamma * g.amax(-1), beta * g.amin(-1)
        scale = ((hi - lo) / (2**self.c - 1)).clamp_min(1e-8)
        return scale, -lo / scale

    def fake_params(self, r: int, mode: str) -> dict:
        """functional_call overrides for the block at slice r (differentiable, STE)."""
        w, over = self.effective()
        params = dict(over)
        for t in self.targets:
            scale, zero = self.qparams(t, w[t])
            params[f"{t}.weight"] = as_param(self.block, t, fake_quant_ste(w[t], scale, zero, self.c, r, mode))
        for n, wt in w.items():  # LET-touched non-target linears keep fp weights
            if n not in self.targets:
                params[f"{n}.weight"] = as_param(self.block, n, wt)
        return params

    @torch.no_grad()
    def finalize(self, param_dtype) -> tuple[dict, dict]:
        """({rel target: QuantizedWeight}, {param name: new fp tensor to write into the block})."""
        w, over = self.effective()
        qws = {}
        for t in self.targets:
            scale, zero = self.qparams(t, w[t])
            tiny, zmax = param_limits(param_dtype)  # the training floor (1e-8) is 0 once stored in fp16
            scale, zero = scale.clamp_min(tiny).to(param_dtype), zero.clamp(-zmax, zmax).to(param_dtype)
            qws[t] = QuantizedWeight(quantize_codes(w[t], scale, zero, self.c), scale, zero, self.c, self.gs[t])
        fp = {k: v.clone() for k, v in over.items()}
        for n, wt in w.items():
            if n not in self.targets:
                fp[f"{n}.weight"] = as_param(self.block, n, wt).clone()
        return qws, fp


def as_param(block, name, w):
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
def smooth_init(block, src, dsts, kind, xs) -> torch.Tensor:
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
        x, window_args = xs
        for i in range(x.shape[0]):
            run_block(block, {}, x[i], *window_args[i])
    finally:
        h.remove()
    return (amax.clamp_min(1e-5).sqrt() / wmax.clamp_min(1e-5).sqrt()).clamp(1e-2, 1e2)
