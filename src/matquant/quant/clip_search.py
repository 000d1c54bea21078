"""The range search of every method: per-group (α, z) minimising the λ-weighted multi-slice error of the codes.

MinMax sets each group's range to [min, max]. Here candidate ranges, scaled at each end by per-group factors
(a, b), are scored with the multi-slice error of the group's codes

    E(a, b) = Σ_r λ_r · Σ_i h_i (w_i − ŵ_{i,r})²,   ŵ_{i,r} = α·(S_r(q_i) − z)

over the served slices r (S_r: the slicing mode's value in master units, `quant.slicing.slice_master`), with
q_i = clamp(floor(w_i/α + z + ½), 0, 2^c − 1) (round-half-up, as everywhere) or a caller's code choice (MatGPTQ's
multi-slice argmin), α and z floored by `minmax.affine_params` / `symmetric_scale` and rounded to the storage dtype
first (so the search scores the parameters that are saved). h is a per-input-column importance: ones (data-free,
"mse") or diag(XᵀX) of the calibration inputs ("weighted").

Per weight, with u = w/α + z, d = u − q and o_r(q) = q − S_r(q): Σ_r λ_r (u − S_r(q))² = Λd² + 2d·C_q + D_q,
C_q = Σ λ_r o_r(q), D_q = Σ λ_r o_r(q)², Λ = Σ λ_r. The tables depend only on (c, R, λ, mode), so one candidate
costs a dozen element-wise operations per weight whatever the number of slices, and the centred form keeps float32
exact enough (no u² − 2uS cancellation).

Two candidate strategies (`strategy`), vectorised over every group of the matrix:

- `coordinate` (the `clip` option of every method): ranges [a·min, b·max] (symmetric: b·absmax). MinMax
  (a = b = 1) is the starting point, then a joint factor t on both ends over `GRID`, then a over `GRID` with b
  fixed, then b with a fixed, then a ±`REFINE` local step on both. A group moves off its current best only for a
  strictly smaller error (relative margin 1e-6), so the result is never worse than MinMax on this objective and
  ties keep MinMax's parameters exactly.
- `midpoint_grid` (MatGPTQ's `group_params='search'`): ranges [m − a·ρ, m + b·ρ] about the MinMax range's mid-point
  m with half-width ρ (symmetric: b·absmax), every pair (a, b) of `MIDPOINT_GRID`: shrinking an end clips, stretching
  it gives the low slices' coarse grid room (in `paper` mode the top int-r level of an int-c code is 2^c − 2^(c−r),
  so MinMax leaves the top of the range without an int2 level). The first pair with the smallest error wins.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch

from matquant.quant.minmax import (QuantizedWeight, affine_params, check_bits, check_storable, check_weight,
                                  grouped, quantize_codes, resolve_group_size, symmetric_scale)
from matquant.quant.rounding import round_half_up
from matquant.quant.slicing import DEFAULT_SLICING, check_slicing, slice_master

CLIP_MODES = ("minmax", "mse", "weighted")  # MinMax; search with h = 1; search with h = diag(XᵀX)
DEFAULT_CLIP = "minmax"
# Slices a MatQuant checkpoint serves when the method has no R of its own (RTN, GPTQ), and their weights
# λ_r = 2^(r−2): between equal weights (int2's error decides and int8 suffers) and 4^r (every slice's relative error
# counted alike); the comparison is in docs/results.md, "Clipping search".
DEFAULT_SERVED = (8, 6, 4, 3, 2)
DEFAULT_SERVED_LAMBDAS = {DEFAULT_SERVED: tuple(2.0 ** (r - 2) for r in DEFAULT_SERVED)}
STRATEGIES = ("coordinate", "midpoint_grid")
GRID = (1.1, 1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)  # coordinate: factors on an end of the MinMax range
REFINE = 0.025
MIDPOINT_GRID = (0.85, 1.0, 1.15, 1.3)  # midpoint_grid: factors on each half of the range (4 × 4 candidates)
_MARGIN = 1e-6

CodesFn = Callable[[torch.Tensor], torch.Tensor]  # u (master code units) -> integer codes 0..2^c-1


def check_clip(clip: str) -> str:
    if clip not in CLIP_MODES:
        raise ValueError(f"unknown clip {clip!r}; choose one of {', '.join(CLIP_MODES)} (minmax: MinMax range; mse: "
                         "searched range, data-free; weighted: searched range weighted by calibration activations).")
    return clip


def served_slices(master_bits: int, slices=None, lambdas=None) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """(R, λ): `slices` (default DEFAULT_SERVED cut to the master, plus the master) and `lambdas` (default
    DEFAULT_SERVED_LAMBDAS for DEFAULT_SERVED, else all 1)."""
    check_bits(master_bits, "master bits")
    if slices is None:
        slices = (master_bits,) + tuple(b for b in DEFAULT_SERVED if b < master_bits)
    bits = tuple(int(b) for b in slices)
    for b in bits:
        check_bits(b, "slice bits")
        if b > master_bits:
            raise ValueError(f"clip search: slice int{b} exceeds the int{master_bits} master.")
    if lambdas is None:
        lam = DEFAULT_SERVED_LAMBDAS.get(bits, (1.0,) * len(bits))
    else:
        lam = tuple(float(x) for x in lambdas)
    if len(lam) != len(bits) or any(not (x >= 0) for x in lam) or sum(lam) <= 0:
        raise ValueError(f"clip search: need one λ >= 0 per slice {list(bits)} with a positive sum, got {list(lam)}.")
    return bits, lam


def check_clip_lambdas(clip_lambdas, clip: str, master_bits: int, bits) -> None:
    """`clip_lambdas` needs a clipping search (clip mse/weighted) and one weight >= 0 per slice of R."""
    if clip_lambdas is None:
        return
    if clip == "minmax":
        raise ValueError("--clip-lambdas weights the slices in the clipping search: it needs --clip weighted or mse "
                         "(the default minmax does not search).")
    if len(tuple(clip_lambdas)) != len(bits):
        raise ValueError(f"--clip-lambdas needs one weight per slice of R = {','.join(map(str, bits))}, got "
                         f"{len(tuple(clip_lambdas))}: {','.join(map(str, clip_lambdas))}.")
    served_slices(master_bits, bits, clip_lambdas)  # λ >= 0 with a positive sum


@lru_cache(maxsize=64)
def _tables(c: int, bits: tuple, lam: tuple, mode: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    q = torch.arange(2**c)
    off = torch.stack([q.double() - slice_master(q, c, r, mode).double() for r in bits])  # [R, 2^c]
    lt = torch.tensor(lam, dtype=torch.float64)[:, None]
    return (lt * off).sum(0).float(), (lt * off * off).sum(0).float(), float(sum(lam))


def multislice_error(g: torch.Tensor, h: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, c: int, tables,
                     codes_fn: CodesFn | None = None) -> torch.Tensor:
    """Σ_i h_i Σ_r λ_r (w_i − ŵ_{i,r})² per group: g [out, n_g, G], h [n_g, G], scale/zero [out, n_g] (float32)."""
    C, D, lam = tables
    s, z = scale.unsqueeze(-1), zero.unsqueeze(-1)
    u = (g / s).add_(z)
    q = round_half_up(u).clamp_(0, 2**c - 1) if codes_fn is None else codes_fn(u).to(u.dtype)
    qi = q.long()
    d = u.sub_(q)  # u is not needed any more
    flat = qi.reshape(-1)  # index_select: much faster than C[qi] on CPU
    e = (d * lam).add_(C.index_select(0, flat).view(qi.shape), alpha=2).mul_(d)
    e.add_(D.index_select(0, flat).view(qi.shape)).mul_(h)
    return e.sum(-1) * (scale * scale)


@dataclass
class ClipResult:
    scale: torch.Tensor  # [out, n_groups] float32, exactly representable in param_dtype
    zero: torch.Tensor  # [out, n_groups] float32, exactly representable in param_dtype
    lo_factor: torch.Tensor  # a: the range's low end factor (1 for symmetric)
    hi_factor: torch.Tensor  # b: the high end factor (symmetric: b·absmax)
    error: torch.Tensor  # the searched objective per group
    # the objective of the MinMax parameters per group (>= error); None for midpoint_grid, which does not start there
    minmax_error: torch.Tensor | None


def _params(g_lo, g_hi, a, b, c, symmetric, pdtype, about_midpoint=False):
    """Stored (α, z) of the ranges [a·lo, b·hi] (about_midpoint: [m − a·ρ, m + b·ρ]; symmetric: b·absmax)."""
    if symmetric:
        s = symmetric_scale(b * g_hi, c, pdtype)
        z = torch.full_like(s, float(2 ** (c - 1)))
    elif about_midpoint:
        mid, rad = (g_lo + g_hi) / 2, (g_hi - g_lo) / 2
        s, z = affine_params(mid - rad * a, mid + rad * b, c, pdtype)
    else:
        s, z = affine_params(a * g_lo, b * g_hi, c, pdtype)
    return s.to(pdtype).float(), z.to(pdtype).float()


@torch.no_grad()
def clip_search(w: torch.Tensor, h: torch.Tensor | None = None, *, bits: int, group_size: int | None,
                symmetric: bool = False, slicing: str = DEFAULT_SLICING, slices=None, lambdas=None,
                param_dtype: torch.dtype = torch.float16, codes_fn: CodesFn | None = None, grid=None,
                refine: float = REFINE, strategy: str = "coordinate") -> ClipResult:
    """Per-group (α, z) of a [out, in] weight minimising the λ-weighted, h-weighted multi-slice error over the
    candidates of `strategy` (see module); `grid` defaults to the strategy's (GRID or MIDPOINT_GRID)."""
    check_bits(bits)
    check_slicing(slicing)
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown range search strategy {strategy!r}; choose one of {', '.join(STRATEGIES)}.")
    check_weight(w)
    gs = resolve_group_size(w.shape[1], group_size)
    R, lam = served_slices(bits, slices, lambdas)
    tables = tuple(t.to(w.device) if torch.is_tensor(t) else t for t in _tables(bits, R, lam, slicing))
    g = grouped(w.detach().float(), gs)
    if h is None:
        hg = torch.ones(g.shape[1:], device=w.device)
    else:
        h = h.detach().float().to(w.device).reshape(-1)
        if h.numel() != w.shape[1] or not torch.isfinite(h).all() or (h < 0).any():
            raise ValueError(f"importance h must be {w.shape[1]} finite non-negative values (one per input column), "
                             f"got {h.numel()} values.")
        hg = h.reshape(g.shape[1], gs)
    g_lo, g_hi = (None, g.abs().amax(-1)) if symmetric else (g.amin(-1), g.amax(-1))
    one = torch.ones_like(g_hi)
    midpoint = strategy == "midpoint_grid"

    best = None  # (a, b, α, z, error) per group

    def consider(ca, cb, margin=_MARGIN):  # a group takes the candidate only for a strictly smaller error
        nonlocal best
        ca = ca.expand_as(one) if torch.is_tensor(ca) else one * ca
        cb = cb.expand_as(one) if torch.is_tensor(cb) else one * cb
        cs, cz = _params(g_lo, g_hi, ca, cb, bits, symmetric, param_dtype, midpoint)
        cand = (ca, cb, cs, cz, multislice_error(g, hg, cs, cz, bits, tables, codes_fn).nan_to_num(float("inf")))
        if best is None:
            best = cand
        else:
            better = cand[4] < best[4] * (1 - margin)
            best = tuple(torch.where(better, x, y) for x, y in zip(cand, best))

    if midpoint:  # every pair of the grid; the first with the smallest error wins
        grid = MIDPOINT_GRID if grid is None else grid
        for ca, cb in [(1.0, t) for t in grid] if symmetric else [(ta, tb) for ta in grid for tb in grid]:
            consider(ca, cb, margin=0.0)
        a, b, s, z, err = best
        return ClipResult(scale=s, zero=z, lo_factor=a, hi_factor=b, error=err, minmax_error=None)
    grid = GRID if grid is None else grid
    consider(1.0, 1.0)  # MinMax
    minmax_error = best[4].clone()
    for t in grid:  # one factor on both ends (symmetric: the only one)
        consider(t, t)
    if not symmetric:
        b0 = best[1].clone()
        for t in grid:  # the low end, the high end at its best joint factor
            consider(t, b0)
        a1 = best[0].clone()
        for t in grid:  # the high end, the low end at its best
            consider(a1, t)
    steps = (-refine, 0.0, refine) if not symmetric else (0.0,)
    ar, br = best[0].clone(), best[1].clone()
    for da in steps:
        for db in (-refine, 0.0, refine):
            if da or db:
                consider((ar + da).clamp_min(0.05), (br + db).clamp_min(0.05))
    if symmetric:
        for db in (-refine / 2, refine / 2):
            consider(best[0], (best[1].clone() + db).clamp_min(0.05))
    a, b, s, z, err = best
    return ClipResult(scale=s, zero=z, lo_factor=a, hi_factor=b, error=err, minmax_error=minmax_error)


def quantize_clipped(w: torch.Tensor, h: torch.Tensor | None, *, bits: int, group_size: int | None,
                     symmetric: bool = False, slicing: str = DEFAULT_SLICING, slices=None, lambdas=None,
                     param_dtype: torch.dtype = torch.float16) -> QuantizedWeight:
    """Round-half-up master codes of `w` under the searched (α, z) (the clipped counterpart of `quantize_minmax`)."""
    gs = resolve_group_size(w.shape[1], group_size)
    res = clip_search(w, h, bits=bits, group_size=gs, symmetric=symmetric, slicing=slicing, slices=slices,
                      lambdas=lambdas, param_dtype=param_dtype)
    scale, zero = res.scale.to(param_dtype), res.zero.to(param_dtype)
    check_storable(scale, zero, param_dtype)
    return QuantizedWeight(codes=quantize_codes(w, scale, zero, bits), scales=scale, zeros=zero, bits=bits,
                           group_size=gs)
