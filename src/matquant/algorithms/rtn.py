"""Round-to-nearest: MinMax (or clipping-searched, `clip`) quantization of each weight independently."""
from __future__ import annotations

from tqdm.auto import tqdm

from matquant.algorithms.blocks import new_results, target_weights
from matquant.algorithms.slice_params import check_post_pass, fit_slice_params, integer_zero_pairs
from matquant.quant.clip_search import quantize_clipped
from matquant.quant.minmax import QuantizedWeight, dequantize_codes, quantize_minmax


def rtn(model, targets: list[str], config, calib=None, progress: bool = True) -> dict[str, QuantizedWeight]:
    """Round-half-up at the master precision (an RTNConfig). clip='minmax': MinMax, data-free, `calib` ignored,
    codes independent of the slicing; 'mse' / 'weighted': each group's (α, z) searched for the served slices
    (quant/clip_search.py); slice_params='own': the served slices' own (α_r, z_r), fitted afterwards on `calib`."""
    c, param_dtype = config, config.torch_param_dtype
    check_post_pass(c.slice_params, calib, "rtn")
    importance = None
    if c.clip == "weighted":
        if calib is None:
            raise ValueError("rtn with clip='weighted' needs calibration windows (calib=token windows; the CLI loads "
                             "them from --calib-text); use clip='mse' for the data-free search.")
        from matquant.algorithms.importance import input_importance

        importance = input_importance(model, targets, calib, progress)
    out = new_results(model)  # on a streamed rerun: the layers a killed run finished
    done = set(out)
    for name, w in tqdm(target_weights(model, targets, skip=done), desc="RTN", disable=not progress, leave=False,
                        total=len(targets) - len(done)):
        if c.clip == "minmax":
            out[name] = quantize_minmax(w, c.master_bits, c.group_size, c.symmetric, param_dtype)
        else:
            h = None if importance is None else importance[name].to(w.device)
            out[name] = quantize_clipped(w, h, bits=c.master_bits, group_size=c.group_size, symmetric=c.symmetric,
                                         slicing=c.slicing, param_dtype=param_dtype)
    if c.slice_params == "own":
        return fit_slice_params(model, targets, out, calib, slicing=c.slicing, symmetric=c.symmetric,
                                param_dtype=param_dtype, progress=progress, zero_points=c.zero_points)
    if c.zero_points == "integer" and not c.symmetric:  # no calibration pass: the master's shared pair is moved
        for name in list(out):  # onto its integer grid against the plain weight error (a dict, or results on disk)
            qw = out[name]
            W = dequantize_codes(qw.codes, qw.scales, qw.zeros)
            out[name] = integer_zero_pairs(qw, W, None, c.slicing, param_dtype, master_only=True)
    return out
