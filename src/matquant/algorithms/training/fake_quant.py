"""Fake-quantized linear layers for end-to-end MatQuant QAT: an fp32 master weight, fake-quantized (STE) to the
current slice r of its int-c master codes in every forward pass.

With ``qparams='minmax'`` (default) α and z are recomputed from the current weights at every forward (MinMax, no
gradient through them), exactly as the final codes are computed; with ``qparams='learnable'`` they start at MinMax
and are trained with the weights (LSQ-style), and the final codes use the learned α, z. In both modes α, z are
rounded to the storage dtype (`param_dtype`) in the forward pass, so training sees the stored grid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from matquant.quant.clip_search import clip_search
from matquant.quant.minmax import (QuantizedWeight, grouped, minmax_params, param_limits, quantize_codes,
                                  quantize_minmax)
from matquant.quant.rounding import round_half_up
from matquant.quant.ste import fake_quant_ste

QPARAM_MODES = ("minmax", "learnable")


class SlicedMinMaxSTE(torch.autograd.Function):
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
                 param_dtype: torch.dtype, qparams: str, slicing: str, clip_init: dict | None = None):
        """`clip_init` (qparams='learnable' only): keyword arguments of `quant.clip_search.clip_search` (slices,
        lambdas, h) whose searched α, z replace MinMax as the learnable parameters' starting values."""
        super().__init__()
        self.weight = nn.Parameter(weight.detach().float().clone())
        self.bias = bias  # the original (frozen) bias, or None
        self.group_size, self.master_bits, self.symmetric = group_size, master_bits, symmetric
        self.param_dtype, self.mode, self.slicing = param_dtype, qparams, slicing
        self.bits = master_bits
        self.cache_qparams = True  # off under FSDP (its gathered weight is refilled without a version change)
        if qparams == "learnable":
            s, z = minmax_params(self.weight.detach(), master_bits, group_size, symmetric)
            if clip_init is not None:
                r = clip_search(self.weight.detach(), clip_init.get("h"), bits=master_bits, group_size=group_size,
                                symmetric=symmetric, slicing=slicing, slices=clip_init.get("slices"),
                                lambdas=clip_init.get("lambdas"), param_dtype=param_dtype)
                s, z = r.scale, r.zero
            # the scale is learned in log space: an optimizer step of lr changes it by a factor ~e^±lr, whatever its
            # magnitude (a weight-sized lr on a raw scale of ~1e-4 moved it by 100x per step and wrecked the slices)
            self.log_scale = nn.Parameter(s.to(param_dtype).float().log())
            self.zero = nn.Parameter(z.to(param_dtype).float(), requires_grad=not symmetric)

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mode == "minmax":  # cached until the optimizer changes the weight (in-place: _version moves)
            key = (self.weight._version, self.weight.data_ptr())
            if getattr(self, "_qp_key", None) != key or not self.cache_qparams:
                with torch.no_grad():
                    s, z = minmax_params(self.weight, self.master_bits, self.group_size, self.symmetric)
                    self._qp = (s.to(self.param_dtype).float(), z.to(self.param_dtype).float())
                self._qp_key = key
            return self._qp
        tiny, zmax = param_limits(self.param_dtype)  # a floor that survives storage (1e-8 is 0 in fp16)
        s = self.log_scale.exp().clamp_min(tiny)
        s = s + (s.to(self.param_dtype).float() - s).detach()  # storage-dtype rounding, straight-through
        z = self.zero.clamp(-zmax, zmax)
        z = z + (z.to(self.param_dtype).float() - z).detach()
        return s, z

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, z = self.qparams()
        if self.mode == "minmax":
            w = SlicedMinMaxSTE.apply(self.weight, s, z, self.master_bits, self.bits, self.slicing)
        else:
            w = fake_quant_ste(self.weight, s, z, self.master_bits, self.bits, self.slicing)
        return F.linear(x, w, self.bias)

    def final(self) -> QuantizedWeight:
        w = self.weight.detach().float().cpu()
        if self.mode == "minmax":
            return quantize_minmax(w, self.master_bits, self.group_size, self.symmetric, self.param_dtype)
        tiny, zmax = param_limits(self.param_dtype)
        s = self.log_scale.detach().exp().clamp_min(tiny).to(self.param_dtype).cpu()
        z = self.zero.detach().clamp(-zmax, zmax).to(self.param_dtype).cpu()
        return QuantizedWeight(codes=quantize_codes(w, s, z, self.master_bits), scales=s, zeros=z,
                               bits=self.master_bits, group_size=self.group_size)

    def trainable(self) -> dict[str, nn.Parameter]:
        out = {"weight": self.weight}
        if self.mode == "learnable":
            out["log_scale"] = self.log_scale
            if not self.symmetric:
                out["zero"] = self.zero
        return out


def set_layer_bits(layers: dict[str, FakeQuantLinear], bits: int) -> None:
    for m in layers.values():
        m.bits = bits
