"""Round-to-nearest: MinMax (or clipping-searched, `clip`) quantization of each weight independently."""
from __future__ import annotations

from tqdm.auto import tqdm

from matquant.algorithms.slice_params import DEFAULT_SLICE_PARAMS, check_post_pass, fit_slice_params
from matquant.models.targets import linear_weight
from matquant.quant.clip_search import DEFAULT_CLIP, check_clip, quantize_clipped
from matquant.quant.minmax import QuantizedWeight, quantize_minmax
from matquant.quant.slicing import DEFAULT_SLICING


def rtn(model, targets: list[str], *, master_bits: int, group_size: int, symmetric: bool, param_dtype,
        slicing: str = DEFAULT_SLICING, calib=None, progress: bool = True,
        clip: str = DEFAULT_CLIP, slice_params: str = DEFAULT_SLICE_PARAMS) -> dict[str, QuantizedWeight]:
    """Round-half-up at `master_bits`. clip='minmax' (default): MinMax, data-free, `calib` ignored, codes independent
    of `slicing`. clip='mse': the (α, z) of each group searched for the served slices (quant/clip_search.py) under
    `slicing`, data-free; clip='weighted': the same weighted by the calibration inputs' mean x² (needs `calib`).
    slice_params='own': the served slices' own (α_r, z_r), fitted afterwards on `calib` (algorithms/slice_params.py)."""
    check_clip(clip)
    check_post_pass(slice_params, calib, "rtn")
    importance = None
    if clip == "weighted":
        if calib is None:
            raise ValueError("rtn with clip='weighted' needs calibration windows (calib=token windows; the CLI loads "
                             "them from --calib-text); use clip='mse' for the data-free search.")
        from matquant.algorithms.importance import input_importance

        importance = input_importance(model, targets, calib, progress)
    mods = dict(model.named_modules())
    out = {}
    for name in tqdm(targets, desc="RTN", disable=not progress, leave=False):
        w = linear_weight(mods[name]).detach()
        if clip == "minmax":
            out[name] = quantize_minmax(w, master_bits, group_size, symmetric, param_dtype)
        else:
            h = None if importance is None else importance[name].to(w.device)
            out[name] = quantize_clipped(w, h, bits=master_bits, group_size=group_size, symmetric=symmetric,
                                         slicing=slicing, param_dtype=param_dtype)
    if slice_params == "own":
        return fit_slice_params(model, targets, out, calib, slicing=slicing, symmetric=symmetric,
                                param_dtype=param_dtype, progress=progress)
    return out
