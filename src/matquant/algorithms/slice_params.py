"""Slice-own group parameters (`slice_params='own'`): every served slice below the master reads the master's codes
with its own (α_r, z_r), fitted by least squares on that slice's calibration output error ‖(W − Ŵ_r)X‖² for the
unchanged codes (quant/refit.refit_params, one fit per slice); the shared (α, z) then serve the master alone and
are refit to its own error. A served slice costs the same bits and runs through the same kernels either way; the
checkpoint holds one more (α, z) pair per group and slice (docs/results.md, "Slice-own group parameters").

GPTQ and MatGPTQ fit them inside their own block-wise pass, with the Hessian H = XᵀX they build anyway
(`with_slice_params`). RTN, OmniQuant and QAT build none, so for them `fit_slice_params` runs one more block-wise
pass over the calibration windows after the method (algorithms/hessian_pass.py): each target's H from its inputs
in the model whose earlier targets already hold their dequantized master (as GPTQ sees them), and W = the target's
full-precision weight as the method leaves it in the model (the original weight; the LET-folded one for
omniquant --let).

Integer zero points (`zero_points`, rtn / gptq / matgptq): pairs moved onto their slice's integer-zero grid for the
same codes (quant/integer_zero.py), so that the compressed-tensors (vLLM) export of those slices is exact
(docs/export.md). `master` (the default): the master's pair where it serves the master alone (slice_params='own',
the quality recipe); with shared parameters every slice reads the master's pair, so it stays as the method set it.
`integer`: the master's pair in either case, and the own pair of every slice an integer-zero engine serves
(quant/integer_zero.INTEGER_ZERO_BITS: int4, with slice_params='own'), at a measured cost to that slice
(docs/export.md). `free`: fractional zeros everywhere.
"""
from __future__ import annotations

import torch

from matquant.algorithms.hessian_pass import hessian_pass
from matquant.quant.clip_search import DEFAULT_SERVED
from matquant.quant.integer_zero import INTEGER_ZERO_BITS, grid_storable, integer_zero_params
from matquant.quant.minmax import QuantizedWeight
from matquant.quant.refit import refit_params
from matquant.quant.slicing import DEFAULT_SLICING

SLICE_PARAMS = ("shared", "own")
DEFAULT_SLICE_PARAMS = "shared"  # the paper's: every slice reads its codes with the master's (α, z)
ZERO_POINTS = ("master", "integer", "free")
# the configs' default (rtn, gptq, matgptq): the master's integer zeros cost it ~nothing where it reads them alone; the
# int4 slice's cost it clearly (measured in docs/export.md), so those are asked for with 'integer'
DEFAULT_ZERO_POINTS = "master"


def check_zero_points(zero_points: str, *, symmetric: bool = False, param_dtype: str = "float16",
                      master_bits: int = 8, slicing: str = DEFAULT_SLICING) -> str:
    """`zero_points` if it is known and can be honoured with the quantizer's layout; else one clear ValueError.
    'integer' asks for more than the master's pair (the int4 slice's own pair, a shared master pair): a symmetric
    quantizer has no zero point to move, and bfloat16 cannot store every point of a slice's grid."""
    if zero_points not in ZERO_POINTS:
        raise ValueError(f"unknown zero_points {zero_points!r}; choose one of {', '.join(ZERO_POINTS)} (master: the "
                         "master's own zero points on its integer grid (--slice-params own), its compressed-tensors/"
                         "vLLM export is exact; integer: also a shared master pair and the int4 slice's own; free: "
                         "fractional zero points).")
    if zero_points == "integer":
        if symmetric:
            raise ValueError("--zero-points integer does not apply to a symmetric quantizer (its zero point is fixed "
                             "at the mid-point); drop --symmetric or use --zero-points master/free.")
        dtype = getattr(torch, param_dtype) if isinstance(param_dtype, str) else param_dtype
        bad = [r for r in INTEGER_ZERO_BITS if r <= master_bits and not grid_storable(master_bits, r, slicing, dtype)]
        if bad:
            raise ValueError(f"--zero-points integer: the int{bad[0]} slice's integer zero points are not storable in "
                             f"{str(dtype).split('.')[-1]} with {slicing} slicing; use --param-dtype float16 or "
                             "float32, or --zero-points master.")
    return zero_points


def integer_zero_pairs(qw: QuantizedWeight, W, H, slicing: str, param_dtype, master_only: bool = False
                       ) -> QuantizedWeight:
    """`qw` with the pairs of the INTEGER_ZERO_BITS slices (the master's shared pair if its width is one; unless
    `master_only`, the own pair of such a slice below it) moved onto their integer-zero grids for the same codes
    (quant/integer_zero.integer_zero_params; H None: the plain weight error, group by group). A grid the storage
    dtype cannot hold (bfloat16's for the nested int4 slice) leaves that pair free (its export is then fitted)."""
    kw = dict(master_bits=qw.bits, group_size=qw.group_size, slicing=slicing, param_dtype=param_dtype)

    def fits(r):  # (a grid the storage dtype cannot hold, e.g. bfloat16's for int4: the pair stays free)
        return r in INTEGER_ZERO_BITS and grid_storable(qw.bits, r, slicing, param_dtype)

    if fits(qw.bits):
        qw.scales, qw.zeros = integer_zero_params(W, H, qw.codes, qw.scales, qw.zeros, bits=qw.bits, **kw)
    for r, (s, z) in list((qw.slice_params or {}).items() if not master_only else ()):
        if fits(r):
            qw.slice_params[r] = integer_zero_params(W, H, qw.codes, s, z, bits=r, **kw)
    return qw


def check_slice_params(slice_params: str) -> str:
    if slice_params not in SLICE_PARAMS:
        raise ValueError(f"unknown slice_params {slice_params!r}; choose one of {', '.join(SLICE_PARAMS)} (shared: "
                         "every slice reads its codes with the master's α, z; own: each served precision reads them "
                         "with α, z fitted to its own output error, +1 pair per group and slice in the checkpoint).")
    return slice_params


def with_slice_params(qw: QuantizedWeight, W, H, slice_params: str, slicing: str, symmetric: bool,
                      param_dtype, zero_points: str = "free") -> QuantizedWeight:
    """`qw` with slice-own (α_r, z_r) for the served slices below its master (clip_search.DEFAULT_SERVED), fitted by
    least squares on each slice's output error ‖(W − Ŵ_r)X‖² for the fixed codes, and its shared (α, z), which
    serve the master alone from here on, refit to the master's error alone (one `refit_params` pass, one fit per
    slice; a row keeps its values where the fit does not lower its error); unchanged for slice_params='shared'.

    The codes stay the master's bit prefixes; only how slice r reads them back changes, still one affine map per
    group in master code units: ŵ_r = α_r·(S_r(q) − z_r).

    zero_points: 'master' moves the master's own pair (slice_params='own') onto its integer grid, 'integer' also a
    shared one and the int4 slice's own pair (`integer_zero_pairs`; never for a symmetric quantizer, whose zero stays
    the mid-point)."""
    mode = check_zero_points(zero_points)
    integer, master_only = mode != "free" and not symmetric, mode == "master"
    slices = [b for b in DEFAULT_SERVED if b < qw.bits]
    if slice_params == "shared" or not slices:
        return integer_zero_pairs(qw, W, H, slicing, param_dtype, master_only=True) if mode == "integer" and integer \
            else qw
    fits = refit_params(W, H, qw.codes, qw.scales, qw.zeros, master_bits=qw.bits, group_size=qw.group_size,
                        slicing=slicing, slices=[qw.bits] + slices, symmetric=symmetric, param_dtype=param_dtype,
                        separate=True)
    own = {r: (s.to(param_dtype), z.to(param_dtype)) for r, (s, z, _) in fits.items()}
    qw.scales, qw.zeros = own.pop(qw.bits)
    qw.slice_params = own
    return integer_zero_pairs(qw, W, H, slicing, param_dtype, master_only=master_only) if integer else qw


def check_post_pass(slice_params: str, calib, method: str) -> None:
    """For the methods that fit slice-own parameters after the fact (rtn, omniquant, qat): a bad value or missing
    calibration windows, before any work."""
    check_slice_params(slice_params)
    if slice_params == "own" and not (torch.is_tensor(calib) and calib.dim() == 2 and calib.shape[0] >= 1):
        raise ValueError(f"{method} with slice_params='own' needs calibration windows (calib=token windows; the CLI "
                         "loads them from --calib-text): the slices' own (α, z) are fitted to their output error on "
                         "them.")


def fit_slice_params(model, targets: list[str], qweights: dict[str, QuantizedWeight], calib, *, slicing: str,
                     symmetric: bool, param_dtype, progress: bool = True, device=None,
                     desc: str = "slice-own (α, z)", zero_points: str = "free") -> dict[str, QuantizedWeight]:
    """`qweights` (codes unchanged) with slice-own (α_r, z_r) fitted in one block-wise pass over `calib`; every
    target's weight in `model` is left as its dequantized master, which the caller replaces by MatQuantLinear."""
    def fit(name, W, H):
        q = qweights[name]
        qw = QuantizedWeight(q.codes.to(W.device), q.scales.to(W.device), q.zeros.to(W.device), q.bits,
                             q.group_size)
        return with_slice_params(qw, W, H, "own", slicing, symmetric, param_dtype, zero_points)

    return hessian_pass(model, targets, calib, fit, device=device, progress=progress, desc=desc)
