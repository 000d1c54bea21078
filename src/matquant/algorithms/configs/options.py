"""Config fields that several methods share (the same name, CLI flag and meaning everywhere)."""
from __future__ import annotations

from matquant.algorithms.configs.base import RUNTIME, option
from matquant.algorithms.slice_params import DEFAULT_SLICE_PARAMS, DEFAULT_ZERO_POINTS, SLICE_PARAMS, ZERO_POINTS
from matquant.quant.clip_search import CLIP_MODES, DEFAULT_CLIP


def clip(note: str = ""):
    return option(DEFAULT_CLIP, "group scale/zero of the master: minmax (the MinMax range), mse (per-group search of "
                  "the clipping range minimising the multi-slice error of the served slices, data-free), weighted "
                  "(the same weighted by the calibration inputs' mean x^2 / the GPTQ Hessian diagonal)" + note
                  + ". docs/results.md 'Clipping search'", choices=CLIP_MODES)


def slice_params():
    return option(DEFAULT_SLICE_PARAMS, "group scale/zero of the slices: the master's, shared by every slice (the "
                  "paper's), or each served precision's own, fitted by least squares to that precision's calibration "
                  "output error for the unchanged codes. A served slice costs the same bits either way; the "
                  "checkpoint holds one more pair per group and slice (docs/gptq.md)", choices=SLICE_PARAMS)


def zero_points():
    return option(DEFAULT_ZERO_POINTS, "group zero points: master = the master's own pair (--slice-params own) on its "
                  "integer code grid for the same codes, so its compressed-tensors/vLLM export is exact; integer = "
                  "also a shared master pair and the int4 slice's own pair, exact int4 export at a cost to the int4 "
                  "slice; free = fractional (docs/export.md)", choices=ZERO_POINTS)


def clip_lambdas(served: str):
    return option(None, "with --clip weighted/mse: the slice weights of the clipping search only, one per "
                  f"{served}; a large int8 weight keeps the search from clipping the outlier weights the master "
                  "needs (docs/results.md, 'Recipes')", type="float_list", metavar="L")


def bits_list(default_text: str):
    return option(None, f"precisions optimised jointly (default {default_text}); '2' with --bits-master 8 is "
                  "Single-Precision MatQuant; R = {C} with --bits-master C is a dedicated baseline",
                  type="int_list", metavar="R")


def lambdas(default_text: str):
    return option(None, f"weight of each --bits-list precision, same order (default {default_text})",
                  type="float_list", metavar="L")


def distill():
    return option(None, "co-distillation in the paper's notation: '[8,4,2]' (none), '[8,4,8->2]' (int2 learns only "
                  "from the int8 slice), '[8,4,2,8->2]' (int2: ground truth + int8 teacher), '[8,4,2,8->4;2]'",
                  metavar="SPEC")


def seed(default):
    return option(default, "data order / RNG seed (default 0)", type=int)


def work_dir(help_text: str):
    return option(None, help_text, kind=RUNTIME)
