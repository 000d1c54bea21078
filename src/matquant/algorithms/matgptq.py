"""MatGPTQ: one-shot multi-precision GPTQ (after arXiv 2602.03537) in matquant's checkpoint format.

GPTQ's column loop (`gptq.gptq_columns`) with MatGPTQ's code choice and error feedback (algorithms/multislice_codes.py:
each weight's int-c code minimises the λ-weighted error of every requested slice; the residual fed back is a mean
over the slices, or the master's alone). The group parameters (α, z) are fixed when the loop reaches a group, as in
GPTQ: MinMax at c bits, or the range search of quant/clip_search.py for the same R, λ and code choice (`clip` mse /
weighted: its coordinate strategy; `group_params='search'`: its midpoint grid, h = 1).
"""
from __future__ import annotations

import torch

from matquant.algorithms.gptq import DEFAULT_BLOCKSIZE, group_params_fn, gptq_columns
from matquant.algorithms.hessian_pass import hessian_pass
from matquant.algorithms.multislice_codes import MultiSliceRounder
from matquant.algorithms.slice_params import with_slice_params
from matquant.quant.clip_search import DEFAULT_CLIP, check_clip
from matquant.quant.minmax import QuantizedWeight, resolve_group_size
from matquant.quant.refit import refit_params

GROUP_PARAMS = ("minmax", "search")
DEFAULT_GROUP_PARAMS = "minmax"


def matgptq_quantize_weight(W, H, rounder: MultiSliceRounder, group_size: int, symmetric: bool = False,
                            param_dtype=torch.float16, percdamp: float = 0.01, act_order: bool = False,
                            group_params: str = "minmax", blocksize: int = DEFAULT_BLOCKSIZE, name: str = "layer",
                            clip: str = DEFAULT_CLIP, refit: bool = False, clip_lambdas=None):
    check_group_params(group_params, clip)
    gs = resolve_group_size(W.shape[1], group_size)
    if group_params == "search":  # the range search's midpoint grid, data-free, for the code choice's R and λ
        pfn = group_params_fn("mse", H, rounder.c, symmetric, param_dtype, rounder.mode, rounder.bits, rounder.lam,
                              rounder.codes, strategy="midpoint_grid")
    else:
        pfn = group_params_fn(clip, H, rounder.c, symmetric, param_dtype, rounder.mode, rounder.bits,
                              rounder.lam if clip_lambdas is None else tuple(clip_lambdas), rounder.codes)
    codes, s, z, loss = gptq_columns(W, H, group_size=gs, params_fn=pfn, round_fn=rounder.round, percdamp=percdamp,
                                     act_order=act_order, blocksize=blocksize, name=name)
    if refit:  # (α, z) re-solved for the chosen codes against every slice's output error (quant/refit.py)
        s, z, _ = refit_params(W, H, codes, s, z, master_bits=rounder.c, group_size=gs, slicing=rounder.mode,
                               slices=rounder.bits, lambdas=rounder.lam, symmetric=symmetric, param_dtype=param_dtype)
    return QuantizedWeight(codes=codes, scales=s.to(param_dtype), zeros=z.to(param_dtype), bits=rounder.c,
                           group_size=gs), loss


def matgptq(model, targets: list[str], config, calib=None, progress: bool = True) -> dict[str, QuantizedWeight]:
    """Multi-precision GPTQ (a MatGPTQConfig): int-C codes good for every precision in `bits_list` under the
    slicing. `clip`: group (α, z) by MinMax or by the clipping search for the same R, λ and code choice
    (`clip_lambdas` replaces λ in that search only); `refit`: (α, z) re-solved for the codes on
    Σ_r λ_r ‖(W − Ŵ_r)X‖²; slice_params='own': each served slice its own (α_r, z_r). `propagate`: what later layers
    see during the pass: the int-C weights ("master"), one slice (an int r) or the full-precision weights ("fp")."""
    c, param_dtype = config, config.torch_param_dtype
    rounder = MultiSliceRounder(c.master_bits, c.bits_list, c.lambdas, c.slicing, c.error_feedback)
    prop = propagate_fn(c.propagate, c.master_bits, c.slicing)

    def q(name, W, H):
        qw, _ = matgptq_quantize_weight(W, H, rounder, c.group_size, c.symmetric, param_dtype, c.damp, c.act_order,
                                        c.group_params, c.blocksize, name, c.clip, c.refit, c.clip_lambdas)
        return with_slice_params(qw, W, H, c.slice_params, c.slicing, c.symmetric, param_dtype, c.zero_points)

    return hessian_pass(model, targets, calib, q, true_sequential=c.true_sequential, device=c.device,
                        batch_size=c.batch_size, progress=progress, propagate=prop,
                        desc=f"MatGPTQ int{c.master_bits} {'/'.join(map(str, rounder.bits))}")


def check_group_params(group_params: str, clip: str) -> None:
    if group_params not in GROUP_PARAMS:
        raise ValueError(f"group params must be one of {', '.join(GROUP_PARAMS)}, got {group_params!r}")
    check_clip(clip)
    if group_params == "search" and clip != "minmax":
        raise ValueError(f"--group-params search and --clip {clip} both choose the group (α, z); give one of them "
                         "(--clip is the finer, importance-weighted search).")


def propagate_fn(propagate, master_bits: int, slicing: str):
    """The `propagate` option of matgptq as a function (qw, W) -> weight for the rest of the pass (None: master)."""
    if propagate in ("master", None) or (str(propagate).isdigit() and int(propagate) == master_bits):
        return None
    if propagate == "fp":
        return lambda qw, W: W
    if str(propagate).isdigit() and 1 <= int(propagate) < master_bits:
        r = int(propagate)
        from matquant.quant.minmax import dequantize
        return lambda qw, W: dequantize(qw, r, slicing)
    raise ValueError(f"propagate must be 'master', 'fp' or a slice precision 1..{master_bits}, got {propagate!r}.")
