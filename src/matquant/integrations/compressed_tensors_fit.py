"""Fit a slice onto the compressed-tensors grid (the numeric half of the compressed-tensors export; the folder is
written by `compressed_tensors_export`).

compressed-tensors dequantizes W = scale · (q − zp) with q, zp signed r-bit integers (q in −2^(r−1)..2^(r−1)−1).
Our slice is W = A · (q_r + B/A), so it is exactly representable iff zp = −2^(r−1) − B/A is an integer (and in
range) for every group: always for r = master bits with integer zeros (RTN/GPTQ MinMax), otherwise only where
(z − c)/2^s happens to be an integer. Elsewhere we fit, per group, the integer-zero grid nearest to OUR slice values
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
    scale·(q − zp) the compressed-tensors grid nearest to the slice; `exact` where it equals the slice's own.

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
    v = st.reference.double().reshape(st.shape[0], -1, st.group_size)  # [rows, n_groups, group size]
    a, b = st.a.double() / n, st.b.double()
    zp_frac = lo - b / torch.where(a == 0, torch.ones_like(a), a)
    exact = ((zp_frac - torch.round(zp_frac)).abs() < 1e-6) & (zp_frac.round() >= lo) & (zp_frac.round() <= hi)
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
    return (best_s.to(scale_dtype), best_z.to(torch.int8), q.reshape(st.shape).to(torch.int8), exact)
