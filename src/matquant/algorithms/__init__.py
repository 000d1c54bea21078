"""Quantization methods. Each is a plain function

    method(model, targets, *, master_bits, group_size, symmetric, param_dtype, slicing, calib, progress, **kw)
        -> {module name: QuantizedWeight}

that may use calibration token windows `calib` ([n, seqlen] LongTensor). `quantize_model` swaps the returned
codes into the model as MatQuantLinear layers and returns the checkpoint's QuantConfig.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

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


from matquant.algorithms.gptq import gptq  # noqa: E402
from matquant.algorithms.matgptq import matgptq  # noqa: E402

register_method("gptq", gptq, needs_calibration=True)
register_method("matgptq", matgptq, needs_calibration=True)

from matquant.algorithms.omniquant import omniquant  # noqa: E402

register_method("omniquant", omniquant, needs_calibration=True)


def quantize_model(
    model, method: str = "rtn", *, master_bits: int = 8, group_size: int = 64, scope: str = "ffn",
    modules: str | None = None, symmetric: bool = False, slicing: str = DEFAULT_SLICING, param_dtype: str = "float16",
    calib: torch.Tensor | None = None, progress: bool = True, **method_args,
) -> QuantConfig:
    """Quantize `model` in place (targets become MatQuantLinear) and return its QuantConfig."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}.")
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
    qweights = METHODS[method](model, targets, master_bits=master_bits, group_size=group_size, symmetric=symmetric,
                               param_dtype=pdtype, slicing=slicing, calib=calib, progress=progress, **method_args)
    replace_with_matquant(model, qweights, slicing=slicing)
    return QuantConfig(master_bits=master_bits, group_size=group_size, symmetric=symmetric, slicing=slicing,
                       scope=scope if modules is None else "custom", modules=list(targets),
                       default_bits=master_bits, method=method, method_args=_jsonable(method_args),
                       param_dtype=param_dtype).validate()


def _jsonable(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, list, tuple, type(None)))}


from matquant.algorithms.qat import qat  # noqa: E402  (needs register_method defined above)

register_method("qat", qat, needs_calibration=True)

__all__ = ["METHODS", "register_method", "quantize_model", "rtn", "gptq", "matgptq", "qat"]
