"""`MethodConfig`: the options of one quantization method as a dataclass, the one description of them that the
Python API, the CLI (its flags and `--help` are generated from the fields), recipes and experiment grids share.

A subclass per method (configs/rtn.py, gptq.py, ...) declares the method's own fields; every field carries its
help text and CLI spelling in `option(...)`. `validate()` raises the clear error a user should see before any work
starts; `run(model, targets, calib)` does the work and returns {module name: QuantizedWeight}.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar

from matquant.models.targets import SCOPES
from matquant.quant.slicing import DEFAULT_SLICING, SLICING_MODES

LAYOUT = "layout"  # options every method takes, stored as the checkpoint's own keys (not method_args)
METHOD = "method"  # the method's own options (recorded in quantization_config.method_args)
RUNTIME = "runtime"  # how the work runs (where, how often to save): passed to the method, not recorded
PIPELINE = "pipeline"  # read by the pipeline only (not passed to the method, not recorded)


def option(default: Any, help: str, *, kind: str = METHOD, flag: str | None = None, choices=None, type=None,
           metavar: str | None = None, action: str | None = None, cli: bool = True):
    """A config field with its help text and CLI spelling (`flag`: default --field-name; cli=False: no flag)."""
    meta = dict(help=help, kind=kind, flag=flag, choices=choices, type=type, metavar=metavar, action=action, cli=cli)
    return field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def dest_of(f: dataclasses.Field) -> str:
    """The argparse destination of the field's flag (two methods may spell one field name differently)."""
    return flag_of(f)[2:].replace("-", "_")


@dataclass
class MethodConfig:
    """The options every method takes. Subclasses add the method's own and implement `run`."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    function: ClassVar[str] = ""  # "module:function" doing the work (see algorithms/__init__.py)
    calib_defaults: ClassVar[tuple[int, int]] = (32, 512)  # (windows, tokens per window) when calibration is read
    data_driven: ClassVar[bool] = True  # always reads calibration windows

    master_bits: int = option(8, "bits of the stored master codes; every precision <= C is sliced from them",
                              kind=LAYOUT, flag="--bits-master", metavar="C")
    group_size: int = option(64, "input weights per (scale, zero) group; -1 = per output channel", kind=LAYOUT)
    scope: str = option("ffn", "which linear layers to quantize", kind=LAYOUT, choices=SCOPES)
    modules: str | None = option(None, "quantize exactly the linear layers whose full name matches REGEX (any "
                                       "architecture)", kind=LAYOUT, metavar="REGEX")
    symmetric: bool = option(False, "symmetric quantizer (zero-point fixed at 2^(C-1))", kind=LAYOUT,
                             action="store_true")
    slicing: str = option(DEFAULT_SLICING, "how an r-bit slice is read from the C-bit codes: paper (round-half-up + "
                          "clamp, the paper's), nested (truncate + bucket centre: an exact bit prefix), extra (no "
                          "clamp, 2^r+1 levels). Data-driven methods optimise the codes for this mode; it is stored "
                          "as the checkpoint's default and can be changed at eval time (docs/results.md)",
                          kind=LAYOUT, choices=SLICING_MODES)
    param_dtype: str = option("float16", "storage dtype of scales and zeros", kind=LAYOUT,
                              choices=("float16", "bfloat16", "float32"))
    rotate: str = option("none", "incoherence processing: input = randomized Hadamard over each layer's input "
                         "dimension, block = one per group (both rotate the input online; GGUF/compressed-tensors "
                         "export refuse them); residual = one over the residual stream folded into the weights "
                         "(Llama/Mistral/Qwen2/3, nothing online). docs/rotation.md", kind=LAYOUT,
                         choices=("none", "input", "block", "residual"))
    rotate_seed: int = option(0, "seed of the rotation's random signs", kind=LAYOUT)

    # --- validation -------------------------------------------------------------------------------------------
    def validate(self) -> "MethodConfig":
        """Check every option (the clear errors of the CLI, before any model is loaded); returns self."""
        from matquant.quant.minmax import check_bits
        from matquant.quant.rotation import make_spec
        from matquant.quant.slicing import check_slicing

        check_bits(self.master_bits, "master bits")
        check_slicing(self.slicing)
        if not isinstance(self.group_size, int) or (self.group_size < 1 and self.group_size != -1):
            raise ValueError(f"--group-size (group_size) must be a positive integer or -1 (per output channel), got "
                             f"{self.group_size!r}.")
        make_spec(self.rotate, self.group_size, self.rotate_seed)
        self.validate_method()
        return self

    def validate_method(self) -> None:
        """The method's own checks (subclasses extend them)."""
        from matquant.algorithms.slice_params import check_slice_params
        from matquant.quant.clip_search import check_clip

        if hasattr(self, "clip"):
            check_clip(self.clip)
        if hasattr(self, "slice_params"):
            check_slice_params(self.slice_params)

    def validate_objective(self) -> None:
        """For the methods trained on a multi-precision objective (R, λ, distillation) with a searched start."""
        from matquant.algorithms.training.objective import build_objective
        from matquant.quant.clip_search import check_clip_lambdas

        obj = build_objective(self.bits_list, self.lambdas, self.distill, master_bits=self.master_bits,
                              slicing=self.slicing)
        check_clip_lambdas(self.clip_lambdas, self.clip, self.master_bits, obj.bits)

    def needs_calibration(self) -> bool:
        """Whether this configuration reads calibration windows."""
        return self.data_driven or getattr(self, "clip", None) == "weighted" \
            or getattr(self, "slice_params", None) == "own"

    # --- the work ---------------------------------------------------------------------------------------------
    def run(self, model, targets: list[str], calib, progress: bool = True, **hooks) -> dict:
        """Quantize `targets` of `model` with the method's function `fn(model, targets, config, calib, progress)`;
        returns {module name: QuantizedWeight}. `hooks`: callbacks of a run (e.g. qat's step_callback)."""
        import importlib

        module, fn = self.function.split(":")
        return getattr(importlib.import_module(module), fn)(model, targets, self, calib, progress, **hooks)

    def for_output(self, out) -> "MethodConfig":
        """The config as it runs when the checkpoint goes to `out` (a method with training state puts it there)."""
        return self

    @property
    def torch_param_dtype(self):
        import torch

        return getattr(torch, self.param_dtype)

    def method_kwargs(self, kinds=(METHOD, RUNTIME)) -> dict:
        """This method's own options as the method function's keyword arguments."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("kind") in kinds}

    def method_args(self) -> dict:
        """The options recorded in the checkpoint (quantization_config.method_args): the method's own options that
        differ from its defaults."""
        defaults = {f.name: f.default for f in self.option_fields((METHOD,))}
        out = {}
        for k, v in self.method_kwargs((METHOD,)).items():
            v = list(v) if isinstance(v, tuple) else v
            d = list(defaults[k]) if isinstance(defaults[k], tuple) else defaults[k]
            if v != d and isinstance(v, (int, float, str, bool, list, type(None))):
                out[k] = v
        return out

    # --- construction -----------------------------------------------------------------------------------------
    @classmethod
    def option_fields(cls, kinds=(LAYOUT, METHOD, RUNTIME, PIPELINE)) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.metadata.get("kind") in kinds]

    @classmethod
    def from_options(cls, **options) -> "MethodConfig":
        """The config from keyword options; an unknown one is an error naming the valid ones."""
        valid = [f.name for f in cls.option_fields()]
        unknown = [k for k in options if k not in valid]
        if unknown:
            own = [f.name for f in cls.option_fields((METHOD, RUNTIME, PIPELINE))]
            hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, valid, 1)) else repr(k)
                     for k in unknown]
            raise ValueError(f"unknown option(s) for method {cls.name!r}: {', '.join(hints)}. Its options: "
                             f"{', '.join(own) or '(none)'}; every method also takes "
                             f"{', '.join(f.name for f in cls.option_fields((LAYOUT,)))}.")
        return cls(**options)

    def replace(self, **options) -> "MethodConfig":
        """A copy with `options` changed (checked like from_options)."""
        return type(self).from_options(**{**self.options(), **options})

    def options(self) -> dict:
        return {f.name: getattr(self, f.name) for f in self.option_fields()}


METHOD_CONFIGS: dict[str, type[MethodConfig]] = {}


def register_config(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Class decorator: make `cls` available by its `name` (CLI --method, grids, quantize(method=...))."""
    METHOD_CONFIGS[cls.name] = cls
    return cls


def config_class(method: str) -> type[MethodConfig]:
    if method not in METHOD_CONFIGS:
        close = difflib.get_close_matches(str(method), METHOD_CONFIGS, 1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown method {method!r}{hint}; available: {', '.join(sorted(METHOD_CONFIGS))}.")
    return METHOD_CONFIGS[method]


def make_config(method: str, **options) -> MethodConfig:
    """The validated config of `method` with `options` (the Python API's and grids' keyword spelling)."""
    return config_class(method).from_options(**options).validate()
