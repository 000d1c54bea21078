"""Quantization methods. Each is a plain function

    method(model, targets, *, master_bits, group_size, symmetric, param_dtype, slicing, calib, progress,
           <its own keyword options>) -> {module name: QuantizedWeight}

that may use calibration token windows `calib` ([n, seqlen] LongTensor). `quantize_model` checks the options
against the method's signature (an unknown option is an error naming the valid ones: nothing is silently dropped,
so the checkpoint's `method_args` are exactly the options that were used), swaps the returned codes into the model
as MatQuantLinear layers and returns the checkpoint's QuantConfig.
"""
from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable

import torch

from matquant.algorithms.rotate import rotated_targets
from matquant.algorithms.rtn import rtn
from matquant.format.config import QuantConfig
from matquant.models.targets import find_targets
from matquant.nn.replace import replace_with_matquant
from matquant.quant.minmax import check_bits, resolve_group_size
from matquant.quant.slicing import DEFAULT_SLICING, check_slicing

METHODS: dict[str, Callable] = {"rtn": rtn}
CALIBRATED = set()  # methods that need calibration windows


def register_method(name: str, fn: Callable, needs_calibration: bool = False) -> None:
    METHODS[name] = fn
    if needs_calibration:
        CALIBRATED.add(name)


def needs_calibration(method: str, options: dict) -> bool:
    """Whether `method` with these options reads calibration windows: the data-driven methods always; RTN with
    the weighted clipping search (clip='weighted') or slice-own parameters (slice_params='own')."""
    return method in CALIBRATED or options.get("clip") == "weighted" or options.get("slice_params") == "own"


from matquant.algorithms.gptq import gptq  # noqa: E402
from matquant.algorithms.matgptq import matgptq  # noqa: E402

register_method("gptq", gptq, needs_calibration=True)
register_method("matgptq", matgptq, needs_calibration=True)

from matquant.algorithms.omniquant import omniquant  # noqa: E402

register_method("omniquant", omniquant, needs_calibration=True)


# keyword arguments quantize_model passes to every method itself (not method options)
COMMON_ARGS = ("master_bits", "group_size", "symmetric", "param_dtype", "slicing", "calib", "progress")


def method_options(method: str) -> list[str]:
    """The method-specific keyword options `method` accepts (private `_test_hooks` not listed)."""
    sig = inspect.signature(METHODS[method])
    return [n for n, p in sig.parameters.items() if p.kind == p.KEYWORD_ONLY and n not in COMMON_ARGS
            and not n.startswith("_")]


def check_method_options(method: str, options: dict) -> None:
    """Raise ValueError naming the valid options if `options` holds one that `method` does not take."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}.")
    params = inspect.signature(METHODS[method]).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return  # a registered third-party method that takes **kwargs checks its own options
    valid = method_options(method)
    unknown = [k for k in options if k not in params or k in ("model", "targets")]
    if unknown:
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, valid, 1)) else repr(k)
                 for k in unknown]
        raise ValueError(f"unknown option(s) for method {method!r}: {', '.join(hints)}. Its options: "
                         f"{', '.join(valid) or '(none)'}; every method also takes master_bits, group_size, scope, "
                         "modules, symmetric, slicing, param_dtype, calib, progress, rotate, rotate_seed.")


def quantize_model(
    model, method: str = "rtn", *, master_bits: int = 8, group_size: int = 64, scope: str = "ffn",
    modules: str | None = None, symmetric: bool = False, slicing: str = DEFAULT_SLICING, param_dtype: str = "float16",
    calib: torch.Tensor | None = None, progress: bool = True, rotate: str = "none", rotate_seed: int = 0,
    **method_args,
) -> QuantConfig:
    """Quantize `model` in place (targets become MatQuantLinear) and return its QuantConfig.

    `rotate`: 'none', 'input' (randomized Hadamard over each target's input dimension) or 'block' (one per group),
    applied before the method runs and online at inference (algorithms/rotate.py, quant/rotation.py); or
    'residual' (one over the residual stream, folded into the whole model's weights before the method runs, nothing
    online: algorithms/residual_rotation.py; the float model changes its weights, not its outputs). The spec is
    stored in the QuantConfig. `rotate_seed` seeds its random signs."""
    check_method_options(method, method_args)
    from matquant.quant.rotation import make_spec, online_spec

    rotation = make_spec(rotate, group_size, rotate_seed)
    online = online_spec(rotation)
    if online is not None and method_args.get("let"):
        raise ValueError("LET (--let) folds per-channel scales into the RMSNorm/up_proj that feed the rotated layers, "
                         "which an input rotation does not commute with; use --rotate none with --let, or drop --let.")
    check_bits(master_bits, "master bits")
    check_slicing(slicing)
    if method in CALIBRATED and calib is None:
        raise ValueError(f"method {method!r} needs calibration data (calib=token windows).")
    targets = find_targets(model, scope, modules)
    mods = dict(model.named_modules())
    from matquant.models.targets import linear_weight

    for n in targets:  # validate the group size before any work
        resolve_group_size(linear_weight(mods[n]).shape[1], group_size)
    pdtype = getattr(torch, param_dtype)
    if rotation is not None and rotation["mode"] == "residual":
        from matquant.algorithms.residual_rotation import fold_residual_rotation

        fold_residual_rotation(model, rotation["seed"])
    with rotated_targets(model, targets, online):
        qweights = METHODS[method](model, targets, master_bits=master_bits, group_size=group_size,
                                   symmetric=symmetric, param_dtype=pdtype, slicing=slicing, calib=calib,
                                   progress=progress, **method_args)
    own = {tuple(sorted(qw.slice_params or ())) for qw in qweights.values()}
    if len(own) > 1:
        raise RuntimeError(f"the layers got different slice-own parameter sets {sorted(own)}; a bug, please report it.")
    slice_params = list(own.pop()) or None
    replace_with_matquant(model, qweights, slicing=slicing)
    if online is not None:
        for n in targets:
            model.get_submodule(n).set_rotation(online)
    return QuantConfig(master_bits=master_bits, group_size=group_size, symmetric=symmetric, slicing=slicing,
                       scope=scope if modules is None else "custom", modules=list(targets),
                       default_bits=master_bits, method=method, method_args=_jsonable(method_args),
                       param_dtype=param_dtype, rotation=rotation, slice_params=slice_params).validate()


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}


from matquant.algorithms.qat import qat  # noqa: E402  (needs register_method defined above)

register_method("qat", qat, needs_calibration=True)

__all__ = ["METHODS", "register_method", "quantize_model", "check_method_options", "method_options", "rtn", "gptq",
           "matgptq", "omniquant", "qat"]
