"""Asymmetric (and symmetric) MinMax quantization, per output channel or per group of input weights.

Paper notation (MatQuant, Nair et al. 2025, eq. 1): q = clamp(floor(w/α + z + 0.5), 0, 2^c − 1) with
α = (max − min)/(2^c − 1) and z = −min/α. Dequantization is α·(q − z).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from matquant.quant.rounding import round_half_up
from matquant.quant.slicing import DEFAULT_SLICING, slice_master


@dataclass
class QuantizedWeight:
    """Master codes and their group-wise affine parameters for one [out, in] weight matrix."""

    codes: torch.Tensor  # uint8 [out, in], values in 0..2^bits-1
    scales: torch.Tensor  # [out, n_groups]
    zeros: torch.Tensor  # [out, n_groups] (float zero-point, in code units)
    bits: int
    group_size: int  # actual group size used (== in_features for per-channel)
    # optional slice-own group parameters {r: (scales, zeros)} in master code units, like `scales`/`zeros`: the
    # r-bit slice reads its (unchanged) codes with these instead of the shared ones (quant/refit.py refit_params)
    slice_params: dict | None = None


def resolve_group_size(in_features: int, group_size: int | None) -> int:
    """Return the group size to use; None, 0 or -1 mean per output channel (one group per row)."""
    if group_size is None or group_size <= 0:
        return in_features
    if in_features % group_size != 0:
        divisors = [d for d in (32, 64, 96, 128, 192, 256) if in_features % d == 0]
        raise ValueError(
            f"group size {group_size} does not divide the input dimension {in_features}. "
            f"Use a divisor of {in_features} (e.g. {', '.join(map(str, divisors)) or 'per-channel: --group-size -1'}) "
            "or --group-size -1 for per-channel quantization."
        )
    return group_size


def check_bits(bits: int, name: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"{name} must be an integer in 1..8, got {bits!r}.")
    return bits


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """View a [out, in] matrix as [out, in/G, G]."""
    out_f, in_f = w.shape
    return w.reshape(out_f, in_f // group_size, group_size)


def param_limits(param_dtype: torch.dtype) -> tuple[float, float]:
    """(smallest scale, largest |zero-point|) that survive storage in `param_dtype`.

    The scale floor is the dtype's smallest normal number (a floor such as 1e-8 rounds to 0 in float16, and z = −min/α
    then becomes ±inf). The zero-point bound 2/eps is the largest magnitude the dtype still stores to within one code
    unit (float16: 2048, bfloat16: 256, float32: 2^24); it is above 2^8 − 1, so every group that contains 0 (every
    group of a real weight, in practice) keeps the paper's α and z exactly.
    """
    fi = torch.finfo(param_dtype)
    return float(fi.tiny), 2.0 / float(fi.eps)


def affine_params(lo: torch.Tensor, hi: torch.Tensor, bits: int,
                  param_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """MinMax α = (hi − lo)/(2^c − 1), z = −lo/α (float32, broadcast of lo and hi), floored to survive `param_dtype`.

    α is at least the dtype's smallest normal and at least max(|lo|, |hi|)/zmax (see `param_limits`), which keeps
    |z| <= zmax: a constant group (hi == lo != 0) gets a small α and a finite z instead of α = 0, z = inf.
    """
    tiny, zmax = param_limits(param_dtype)
    lo, hi = lo.float(), hi.float()
    absmax = torch.maximum(lo.abs(), hi.abs())
    scale = torch.maximum((hi - lo) / (2**bits - 1), absmax / zmax).clamp_min(tiny)
    zero = (-lo / scale).clamp(-zmax, zmax)
    return scale, zero


def symmetric_scale(absmax: torch.Tensor, bits: int, param_dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """α of the symmetric quantizer (codes centred on z = 2^(c−1)), floored at `param_dtype`'s smallest normal."""
    half = 2 ** (bits - 1)
    # codes 0..2^c-1 centred on z = 2^(c-1): the largest positive value α·(2^(c-1)-1) reaches absmax
    return (absmax.float() / max(half - 1, 1)).clamp_min(param_limits(param_dtype)[0])


def minmax_params(w: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                  param_dtype: torch.dtype = torch.float16) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales α and zero-points z ([out, n_groups], float32) of the MinMax quantizer, valid once stored in
    `param_dtype` (see `affine_params`)."""
    g = grouped(w.float(), group_size)
    if symmetric:
        scale = symmetric_scale(g.abs().amax(dim=-1), bits, param_dtype)
        return scale, torch.full_like(scale, float(2 ** (bits - 1)))
    return affine_params(g.amin(dim=-1), g.amax(dim=-1), bits, param_dtype)


def check_storable(scale: torch.Tensor, zero: torch.Tensor, param_dtype: torch.dtype) -> None:
    """Refuse parameters that overflow `param_dtype` (weights too large for it), naming the fix."""
    if not (torch.isfinite(scale).all() and torch.isfinite(zero).all()):
        big = float(scale.float().nan_to_num(float("inf")).abs().max())
        raise ValueError(f"the quantization scales (up to {big:.3g}) do not fit in {str(param_dtype).split('.')[-1]}: "
                         "the weights are too large for it; store the parameters as float32 (--param-dtype float32).")


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """q = clamp(floor(w/α + z + 0.5), 0, 2^c − 1), group-wise; returns uint8 [out, in]."""
    group_size = w.shape[1] // scale.shape[1]
    g = grouped(w.float(), group_size)
    q = round_half_up(g / scale.float().unsqueeze(-1) + zero.float().unsqueeze(-1))
    q = q.clamp(0, 2**bits - 1)
    return q.reshape(w.shape).to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """α·(q − z) for float codes (already sliced, in master units); returns float32 [out, in]."""
    group_size = codes.shape[1] // scale.shape[1]
    g = grouped(codes.float(), group_size)
    w = scale.float().unsqueeze(-1) * (g - zero.float().unsqueeze(-1))
    return w.reshape(codes.shape)


def dequantize(qw: QuantizedWeight, bits: int | None = None, mode: str = DEFAULT_SLICING):
    """Float32 weight of the `bits`-bit slice (default: the master precision) of a QuantizedWeight; a slice with
    its own group parameters (`qw.slice_params`, fitted for the slicing `mode` it was quantized with) uses them."""
    r = qw.bits if bits is None else bits
    s, z = (qw.slice_params or {}).get(r, (qw.scales, qw.zeros))
    return dequantize_codes(slice_master(qw.codes, qw.bits, r, mode), s, z)


def check_weight(w: torch.Tensor) -> None:
    """Refuse a weight that is not a finite 2-D [out, in] tensor, naming the problem."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out, in], got shape {tuple(w.shape)}")
    if not torch.isfinite(w).all():
        raise ValueError("weight contains NaN or Inf values; cannot quantize. Check the source model.")


def quantize_minmax(w: torch.Tensor, bits: int, group_size: int | None = None, symmetric: bool = False,
                    param_dtype: torch.dtype = torch.float16) -> QuantizedWeight:
    """Round-to-nearest MinMax quantization of a [out, in] weight.

    The scales/zeros are rounded to `param_dtype` (the storage dtype) *before* the codes are computed,
    so that the stored codes are exactly the nearest codes under the stored parameters.
    """
    check_bits(bits)
    check_weight(w)
    gs = resolve_group_size(w.shape[1], group_size)
    scale, zero = minmax_params(w, bits, gs, symmetric, param_dtype)
    scale, zero = scale.to(param_dtype), zero.to(param_dtype)
    check_storable(scale, zero, param_dtype)
    codes = quantize_codes(w, scale, zero, bits)
    return QuantizedWeight(codes=codes, scales=scale, zeros=zero, bits=bits, group_size=gs)
