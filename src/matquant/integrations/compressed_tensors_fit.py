"""Fit a slice onto the compressed-tensors grid (the numeric half of the compressed-tensors export; the folder is
written by `compressed_tensors_export`).

compressed-tensors dequantizes W = scale · (q − zp) with q, zp signed r-bit integers (q in −2^(r−1)..2^(r−1)−1).
Our slice is W = A · (q_r + B/A), so it is exactly representable iff zp = −2^(r−1) − B/A is an integer (and in
range) and A representable in the scale dtype, group by group: for checkpoints quantized with
zero_points='integer' (the default of rtn/gptq/matgptq: quant/integer_zero.py) at the int8 master and at an int4
slice with its own pair; for free zero points only where (z − c)/2^s happens to be an integer. Those groups are
written exactly (no fit). Elsewhere we fit, per group, the integer-zero grid nearest to OUR slice values
(scale searched around A, zp the two integers around the fractional one, codes re-rounded) and report the error.
`fit="lsq"` adds a least-squares refit of scale and codes (lower weight rms, worse perplexity: docs/export.md).
"""
from __future__ import annotations

import torch

from matquant.integrations.export_slices import ExportError, SliceTensor

# candidate scales A·(1 + t), t in {−½, −¼, 0, ¼, ½}/(2^r − 1) (why not finer: docs/export.md, "Exactness")
SCALE_STEPS = 5
# how the integer-zero grid is fitted to the slice values: "search" (default) = best of the candidate grids above;
# "lsq" = then per group and zero point zp + {−1, 0, 1}: alternate the least-squares scale for the codes and
# re-rounding the codes (LSQ_ITERS rounds), keeping a change only where the squared error drops. Lower weight rms,
# worse perplexity (docs/export.md, "compressed-tensors: least-squares zero-point fit")
ZERO_FITS = ("search", "lsq")
LSQ_ITERS = 3


def _lsq_refit(v: torch.Tensor, s: torch.Tensor, z: torch.Tensor, err: torch.Tensor, lo: int, hi: int,
               scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Improve per-group (s, z) of the grid s·(q − z) on values v [rows, G, g]: for z + {−1, 0, 1}, alternate
    s = Σ v·(q − z) / Σ (q − z)² (rounded to scale_dtype) and q = clamp(round(v/s) + z); a group takes the new
    (s, z) only where its squared error drops below `err`. Returns (s, z, err).

    Lower weight rms error vs the slice but worse perplexity: the lower rms comes from clipping each group's
    largest weights, and with the worst error per group held little rms gain is left. Hence not the default
    (measured in docs/export.md, "compressed-tensors: least-squares zero-point fit")."""
    for dz in (0, -1, 1):
        zz = (z + dz).clamp(lo, hi)
        ss = s
        for _ in range(LSQ_ITERS):
            c = torch.clamp(torch.round(v / ss[..., None]) + zz[..., None], lo, hi) - zz[..., None]
            den = (c * c).sum(-1)
            s_new = ((v * c).sum(-1) / den.clamp(min=1e-30)).to(scale_dtype).double()
            ss = torch.where((den > 0) & (s_new != 0) & torch.isfinite(s_new), s_new, ss)
            q = torch.clamp(torch.round(v / ss[..., None]) + zz[..., None], lo, hi)
            e = ((v - ss[..., None] * (q - zz[..., None])) ** 2).sum(-1)
            better = e < err
            err, s, z = torch.where(better, e, err), torch.where(better, ss, s), torch.where(better, zz, z)
    return s, z, err


def integer_zero_fit(st: SliceTensor, scale_dtype: torch.dtype, pack_bits: int | None = None, fit: str = "search"
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale [rows, G] in scale_dtype, zp int8 [rows, G], q int8 [rows, cols], exact bool [rows, G]) with
    scale·(q − zp) the compressed-tensors grid nearest to the slice; `exact` where it IS the slice's own (zero point
    an integer in range, scale representable in `scale_dtype`: checkpoints made with zero_points='integer', at the
    int8 master and the int4 slice). Exact groups are written as they are (the slice's codes, its A and integer zp,
    no fit); a tensor whose groups are all exact is not fitted at all.

    `pack_bits` R >= r stores the r-bit slice in R-bit codes: the grid step becomes A/n, n = (2^R − 1) // (2^r − 1)
    (our 2^r levels are every n-th of the 2^R), so the integer-zero offset error shrinks n-fold (2-bit in 4-bit
    codes: n = 5; in 8-bit: n = 85). `fit` is one of ZERO_FITS."""
    if fit not in ZERO_FITS:
        raise ExportError(f"unknown zero-point fit {fit!r}; choose one of {', '.join(ZERO_FITS)}.")
    big = max(st.bits, pack_bits or st.bits)  # the stored code width
    if big > 8:
        raise ExportError(f"{st.module}: compressed-tensors packs 1..8-bit codes, not {big}.")
    if st.levels > 2**big:
        raise ExportError(f"{st.module}: '{st.mode}' slicing at {st.bits} bits has {st.levels} levels; a {big}-bit "
                          "compressed-tensors grid holds 2^{big}. Use --slicing nested/paper or a larger --pack-bits.")
    n = (2**big - 1) // max(st.levels - 1, 1)
    lo, hi = -(2 ** (big - 1)), 2 ** (big - 1) - 1
    a, b = st.a.double() / n, st.b.double()
    zp_frac = lo - b / torch.where(a == 0, torch.ones_like(a), a)
    exact = exact_groups(a, zp_frac, lo, hi, scale_dtype)
    q_exact = st.codes.to(torch.int32) * n + lo  # the slice's own codes, shifted to the signed range
    if bool(exact.all()):  # every group on the grid: written as it is, no fit
        return a.to(scale_dtype), zp_frac.round().to(torch.int8), q_exact.to(torch.int8), exact
    s, z, q = _nearest_grid(st, a, zp_frac, n, big, lo, hi, scale_dtype, fit)
    # groups on the grid keep their exact values (the fit would only re-find them, up to rounding)
    g = st.group_size
    s = torch.where(exact, a.to(scale_dtype), s)
    z = torch.where(exact, zp_frac.round().to(torch.int8), z)
    q = torch.where(exact.repeat_interleave(g, 1), q_exact.to(torch.int8), q)
    return s, z, q, exact


# |zp − round(zp)| below which a group's zero point counts as an integer: the slice constants reach the exporter as
# fp32 A, B (kernels/cpu.slice_params), so an on-grid zero point comes back within ~1e-5 of its integer (r = 8);
# a fractional one that close would be written with an offset of < 1e-4 steps, below the fp16 rounding of the scale
EXACT_ZP_TOL = 1e-4


def exact_groups(a: torch.Tensor, zp_frac: torch.Tensor, lo: int, hi: int, scale_dtype: torch.dtype) -> torch.Tensor:
    """Where the slice IS a compressed-tensors group: its zero point an integer in lo..hi and its scale exactly
    representable in the export's scale dtype (bool [rows, G])."""
    zp = zp_frac.round()
    return ((zp_frac - zp).abs() < EXACT_ZP_TOL) & (zp >= lo) & (zp <= hi) & (a.to(scale_dtype).double() == a) & (a > 0)


def _nearest_grid(st: SliceTensor, a, zp_frac, n: int, big: int, lo: int, hi: int, scale_dtype, fit: str):
    """(scale, zp int8, q int8 [rows, cols]): per group the integer-zero grid nearest to the slice values (module
    docstring)."""
    v = st.reference.double().reshape(st.shape[0], -1, st.group_size)  # [rows, n_groups, group size]
    best_err = best_s = best_z = None
    ts = torch.linspace(-0.5, 0.5, SCALE_STEPS, dtype=torch.float64) / (2**big - 1)
    # plus llm-compressor's own min-max grid (range stretched to include 0): the fallback for groups whose zero
    # point lies outside the r-bit code range (all weights of one sign), where no grid near A covers the values
    vmin, vmax = v.amin(-1).clamp(max=0), v.amax(-1).clamp(min=0)
    s_mm = (vmax - vmin) / (2**big - 1)
    cands = [(a * (1 + t), (torch.floor(zp_frac), torch.ceil(zp_frac))) for t in [torch.zeros((), dtype=torch.float64), *ts]]
    cands.append((s_mm, (lo - torch.round(vmin / torch.where(s_mm == 0, torch.ones_like(s_mm), s_mm)),)))
    for s_raw, zs in cands:
        s = s_raw.to(scale_dtype).double()
        s = torch.where(s == 0, torch.ones_like(s), s)
        for z in zs:
            z = z.clamp(lo, hi)
            q = torch.clamp(torch.round(v / s[..., None]) + z[..., None], lo, hi)
            err = ((v - s[..., None] * (q - z[..., None])) ** 2).sum(-1)
            if best_err is None:
                best_err, best_s, best_z = err, s, z
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    if fit == "lsq":
        best_s, best_z, best_err = _lsq_refit(v, best_s, best_z, best_err, lo, hi, scale_dtype)
    q = torch.clamp(torch.round(v / best_s[..., None]) + best_z[..., None], lo, hi)
    return best_s.to(scale_dtype), best_z.to(torch.int8), q.reshape(st.shape).to(torch.int8)
