"""Quantization methods. Each has a config dataclass (algorithms/configs/: its options, validate(), run()) and a
function doing the work, `method(model, targets, config, calib, progress) -> {module name: QuantizedWeight}`.
A method added with `register_method` is a plain function of keyword options instead,

    method(model, targets, *, master_bits, group_size, symmetric, param_dtype, slicing, calib, progress,
           <its own keyword options>) -> {module name: QuantizedWeight}

The pipeline (algorithms/pipeline.py) runs a config on a model: `quantize_loaded` in memory, `quantize` from a
model source to a checkpoint folder. `quantize_model(model, method, **options)` is the keyword spelling of
`quantize_loaded`.
"""
from __future__ import annotations

from dataclasses import make_dataclass

from matquant.algorithms.configs import (METHOD_CONFIGS, GPTQConfig, MatGPTQConfig, MethodConfig, OmniQuantConfig,
                                         QATConfig, RTNConfig, config_class, make_config, option, register_config)
from matquant.algorithms.configs.base import METHOD, RUNTIME
from matquant.algorithms.gptq import gptq
from matquant.algorithms.matgptq import matgptq
from matquant.algorithms.omniquant import omniquant
from matquant.algorithms.pipeline import Calibration, quantize, quantize_loaded
from matquant.algorithms.qat import qat
from matquant.algorithms.recipes import RECIPES, recipe_config, resolve_config
from matquant.algorithms.rtn import rtn

# keyword arguments that are hooks of a run (callbacks, test switches), passed to the method, never recorded
HOOKS = ("step_callback",)


METHODS = {"rtn": rtn, "gptq": gptq, "matgptq": matgptq, "omniquant": omniquant, "qat": qat}  # name -> function


def register_method(name: str, fn, needs_calibration: bool = False) -> type[MethodConfig]:
    """Add a method given as a plain function (see above); its config class is made from its keyword options."""
    import inspect

    common = {"master_bits", "group_size", "symmetric", "param_dtype", "slicing", "calib", "progress"}
    fields = [(n, object, option(p.default, "", cli=False)) for n, p in inspect.signature(fn).parameters.items()
              if p.kind == p.KEYWORD_ONLY and n not in common and not n.startswith("_")
              and p.default is not inspect.Parameter.empty]

    def run(self, model, targets, calib, progress=True, **hooks):
        return fn(model, targets, master_bits=self.master_bits, group_size=self.group_size, symmetric=self.symmetric,
                  param_dtype=self.torch_param_dtype, slicing=self.slicing, calib=calib, progress=progress,
                  **self.method_kwargs(), **hooks)

    cls = make_dataclass(f"{name}Config", fields, bases=(MethodConfig,),
                         namespace={"name": name, "data_driven": needs_calibration, "run": run})
    register_config(cls)
    METHODS[name] = fn
    return cls


def method_options(method: str) -> list[str]:
    """The method-specific options `method` accepts."""
    return [f.name for f in config_class(method).option_fields((METHOD, RUNTIME))]


def needs_calibration(method: str, options: dict) -> bool:
    """Whether `method` with these options reads calibration windows."""
    cls = config_class(method)
    known = {f.name for f in cls.option_fields()}
    return cls.from_options(**{k: v for k, v in options.items() if k in known}).needs_calibration()


def quantize_model(model, method: str = "rtn", *, calib=None, progress: bool = True, **options):
    """Quantize `model` in place with `method` and its keyword options; returns the checkpoint's QuantConfig."""
    hooks = {k: options.pop(k) for k in list(options) if k.startswith("_") or k in HOOKS}
    return quantize_loaded(model, make_config(method, **options), calib, progress, **hooks)


__all__ = ["METHODS", "METHOD_CONFIGS", "MethodConfig", "RTNConfig", "GPTQConfig", "MatGPTQConfig", "OmniQuantConfig",
           "QATConfig", "Calibration", "RECIPES", "make_config", "config_class", "recipe_config", "resolve_config",
           "quantize", "quantize_loaded", "quantize_model", "register_method",
           "method_options", "needs_calibration", "rtn", "gptq", "matgptq", "omniquant", "qat"]
