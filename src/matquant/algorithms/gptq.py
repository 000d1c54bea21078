"""GPTQ (Frantar et al., 2022) at one bit-width, and the column loop it shares with MatGPTQ.

For each linear layer, with calibration inputs X (rows = tokens):

- H = 2 XᵀX / N (running mean over the calibration tokens, float32; the block-wise pass of
  algorithms/hessian_pass.py);
- dead inputs (H_ii = 0: the input is always zero) get H_ii = 1 and their weight column is set to 0, exactly
  as in the reference implementation; the column then quantizes to the code closest to 0;
- damping: H += percdamp · mean(diag H) · I (default percdamp 0.01). If the Cholesky factorisation still fails
  (numerically singular H), the damping is multiplied by 10 up to 4 times; a ValueError names the layer after that;
- U = upper Cholesky factor of H⁻¹; columns are quantized left to right in blocks of 128 columns: each column's
  rounding error e / U_jj is propagated to the not-yet-quantized columns (within the block at once, to later
  blocks lazily);
- group-wise MinMax parameters (asymmetric, or symmetric with --symmetric; or the clipping search of
  quant/clip_search.py with `clip`, weighted by diag(H) for 'weighted') are fixed on the *error-updated*
  weights when the column loop reaches the first column of a group. With act-order (columns processed by
  decreasing H_jj) the groups would not be contiguous in processing order, so the parameters of every group are
  then fixed up front on the original weights ("static groups"), which keeps the checkpoint format unchanged.

The stored scales and zeros are rounded to the storage dtype before any code is chosen, so the codes are optimal
for the parameters that are actually saved.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from matquant.algorithms.hessian_pass import hessian_pass
from matquant.algorithms.slice_params import with_slice_params
from matquant.quant.clip_search import DEFAULT_CLIP, check_clip, check_clip_lambdas, clip_search, served_slices
from matquant.quant.minmax import QuantizedWeight, check_bits, minmax_params, resolve_group_size
from matquant.quant.refit import refit_params
from matquant.quant.rounding import round_half_up
from matquant.quant.slicing import DEFAULT_SLICING

DEFAULT_BLOCKSIZE = 128


def inverse_cholesky(H: torch.Tensor, percdamp: float, name: str = "layer") -> torch.Tensor:
    """Upper Cholesky factor of (H + damp·I)⁻¹, raising the damping ×10 (up to 4 times) if H is singular.

    H is used as the work matrix (its diagonal is overwritten): pass a copy you no longer need. At most two more
    n×n matrices are alive at once (the factor and its inverse), which is what bounds GPTQ's memory on wide layers."""
    if not percdamp >= 0:
        raise ValueError(f"damping must be >= 0, got {percdamp}")
    diag = H.diagonal()
    diag0 = diag.clone()
    diag_mean = diag0.mean()
    damp = percdamp if percdamp > 0 else 1e-6
    for _ in range(5):
        diag.copy_(diag0 + damp * diag_mean)
        L, info = torch.linalg.cholesky_ex(H)
        if info == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if info == 0 and torch.isfinite(U).all():
                return U
            del U
        else:
            del L
        damp *= 10
    raise ValueError(f"the Hessian of {name} is singular even with damping {damp / 10:g}·mean(diag): its "
                     "calibration inputs are degenerate. Use more/other calibration text or a larger --damp.")


ParamsFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]  # (W_group [out, g], group index)
RoundFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@torch.no_grad()
def gptq_columns(W: torch.Tensor, H: torch.Tensor, *, group_size: int, params_fn: ParamsFn, round_fn: RoundFn,
                 percdamp: float = 0.01, act_order: bool = False, blocksize: int = DEFAULT_BLOCKSIZE,
                 name: str = "layer") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The GPTQ column loop, generic in how groups are parametrised and how a column is rounded.

    params_fn(W_group [out, g], group index) -> (scale [out], zero [out]) as float32 holding the *stored* values;
    round_fn(w [out], scale [out], zero [out]) -> (codes [out] int, value [out] float32): `value` is the
    dequantized weight whose residual w − value is fed back (for MatGPTQ: a mean over the slices).
    Returns (codes uint8 [out, in], scales [out, G], zeros [out, G], weighted loss Σ (w − value)² / U_jj²).
    """
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    out_f, in_f = W.shape
    gs = resolve_group_size(in_f, group_size)
    n_groups = in_f // gs
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    scales = torch.empty(out_f, n_groups, device=W.device)
    zeros = torch.empty(out_f, n_groups, device=W.device)
    static = act_order or n_groups == 1
    if static:
        for g in range(n_groups):
            scales[:, g], zeros[:, g] = params_fn(W[:, g * gs:(g + 1) * gs], g)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U = inverse_cholesky(H, percdamp, name)
    del H
    if not static:  # a group must never straddle two blocks: its parameters are set from the block's columns
        blocksize = gs * max(1, blocksize // gs)
    col_group = (perm if perm is not None else torch.arange(in_f, device=W.device)) // gs
    col_group = col_group.tolist()
    codes = torch.empty(out_f, in_f, dtype=torch.uint8, device=W.device)
    loss = 0.0
    for i1 in range(0, in_f, blocksize):
        i2 = min(i1 + blocksize, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = i1 + i
            g = col_group[j]
            if not static and j % gs == 0:
                scales[:, g], zeros[:, g] = params_fn(W1[:, i:i + gs], g)
            w = W1[:, i]
            q, v = round_fn(w, scales[:, g], zeros[:, g])
            codes[:, j] = q.to(torch.uint8)
            d = U1[i, i]
            err = (w - v) / d
            loss += float((err * err).sum())
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    return codes, scales, zeros, loss / 2


def group_params_fn(clip: str, H: torch.Tensor, bits: int, symmetric: bool, param_dtype: torch.dtype, slicing: str,
                    slices=None, lambdas=None, codes_fn=None, strategy: str = "coordinate") -> ParamsFn:
    """The column loop's group parameters: MinMax (clip='minmax') or the range search of quant/clip_search.py on
    the group's current weights (its `strategy`, served `slices`, `lambdas` and code choice `codes_fn`), with h = 1
    ('mse') or h = diag(H) ('weighted')."""
    check_clip(clip)
    if clip == "minmax":
        def minmax(wg: torch.Tensor, g: int = 0):
            s, z = minmax_params(wg, bits, wg.shape[1], symmetric, param_dtype)
            return s[:, 0].to(param_dtype).float(), z[:, 0].to(param_dtype).float()
        return minmax
    h = torch.diag(H).float().clamp_min(0) if clip == "weighted" else None

    def searched(wg: torch.Tensor, g: int = 0):
        gs = wg.shape[1]
        r = clip_search(wg, None if h is None else h[g * gs:(g + 1) * gs], bits=bits, group_size=gs,
                        symmetric=symmetric, slicing=slicing, slices=slices, lambdas=lambdas, param_dtype=param_dtype,
                        codes_fn=codes_fn, strategy=strategy)
        return r.scale[:, 0], r.zero[:, 0]
    return searched


def check_gptq_clip_lambdas(clip_lambdas, clip: str, master_bits: int) -> None:
    """GPTQ's `clip_lambdas`: one weight >= 0 per served slice of its clipping search (see `gptq`)."""
    check_clip_lambdas(clip_lambdas, clip, master_bits, served_slices(master_bits)[0])


def nearest_round_fn(bits: int) -> RoundFn:
    qmax = 2**bits - 1

    def fn(w, scale, zero):
        q = round_half_up(w / scale + zero).clamp_(0, qmax)
        return q, scale * (q - zero)
    return fn


def gptq_quantize_weight(W: torch.Tensor, H: torch.Tensor, bits: int, group_size: int, symmetric: bool = False,
                         param_dtype: torch.dtype = torch.float16, percdamp: float = 0.01, act_order: bool = False,
                         blocksize: int = DEFAULT_BLOCKSIZE, name: str = "layer", clip: str = DEFAULT_CLIP,
                         slicing: str = DEFAULT_SLICING, refit: bool = False,
                         clip_lambdas=None) -> tuple[QuantizedWeight, float]:
    """GPTQ-quantize one [out, in] weight with Hessian H to `bits` bits; returns (QuantizedWeight, loss).
    `clip` != 'minmax' searches the group parameters for the served slices under `slicing` (quant/clip_search.py),
    weighted by `clip_lambdas` (one per served slice; default: clip_search's)."""
    check_bits(bits)
    gs = resolve_group_size(W.shape[1], group_size)
    pfn = group_params_fn(clip, H, bits, symmetric, param_dtype, slicing, lambdas=clip_lambdas)
    codes, s, z, loss = gptq_columns(W, H, group_size=gs, params_fn=pfn,
                                     round_fn=nearest_round_fn(bits), percdamp=percdamp, act_order=act_order,
                                     blocksize=blocksize, name=name)
    if refit:  # (α, z) re-solved for the chosen codes against the int-`bits` output error (quant/refit.py)
        s, z, _ = refit_params(W, H, codes, s, z, master_bits=bits, group_size=gs, slicing=slicing,
                               symmetric=symmetric, param_dtype=param_dtype)
    return QuantizedWeight(codes=codes, scales=s.to(param_dtype), zeros=z.to(param_dtype), bits=bits,
                           group_size=gs), loss


def gptq(model, targets: list[str], config, calib=None, progress: bool = True) -> dict[str, QuantizedWeight]:
    """Standard GPTQ at the master precision (a GPTQConfig; the dedicated per-bit baseline, same checkpoint format).
    With clip='minmax' its codes do not depend on the slicing; 'mse' / 'weighted' (h = diag H) search each group's
    (α, z) for the served slices (the master and clip_search.DEFAULT_SERVED below it) weighted by `clip_lambdas`
    (e.g. 1,0,0 at master 4 searches for int4 alone); `refit` re-solves (α, z) for the final codes on ‖(W − Ŵ)X‖²;
    slice_params='own' also fits each served slice its own (α_r, z_r) for the same codes (`with_slice_params`)."""
    c, param_dtype = config, config.torch_param_dtype

    def q(name, W, H):
        qw, _ = gptq_quantize_weight(W, H, c.master_bits, c.group_size, c.symmetric, param_dtype, c.damp,
                                     c.act_order, c.blocksize, name, c.clip, c.slicing, c.refit, c.clip_lambdas)
        return with_slice_params(qw, W, H, c.slice_params, c.slicing, c.symmetric, param_dtype, c.zero_points)

    return hessian_pass(model, targets, calib, q, true_sequential=c.true_sequential, device=c.device,
                        batch_size=c.batch_size, progress=progress, desc=f"GPTQ int{c.master_bits}")
