"""The `quantization_config` block of a matquant checkpoint's config.json, with strict validation."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from matquant.quant.minmax import check_bits
from matquant.quant.rotation import check_spec
from matquant.quant.slicing import DEFAULT_SLICING, check_slicing

FORMAT_VERSION = 1
QUANT_METHOD = "matquant"
PARAM_DTYPES = ("float16", "bfloat16", "float32")


# Keys a checkpoint's quantization_config must have. "slicing" is one: the same codes read with the wrong rule give a
# different (much worse) model, so no default is ever guessed at load time.
REQUIRED_KEYS = ("quant_method", "format_version", "master_bits", "group_size", "slicing", "modules")


class CheckpointError(ValueError):
    """A matquant checkpoint is missing, malformed or inconsistent."""


@dataclass
class QuantConfig:
    master_bits: int = 8
    group_size: int = 64  # -1: per output channel
    symmetric: bool = False
    slicing: str = DEFAULT_SLICING  # the slicing the codes were built for: the mode a loaded model reads them with
    scope: str = "ffn"
    modules: list[str] = field(default_factory=list)  # the quantized module names
    default_bits: int = 8  # precision a loaded model starts at
    bits_map: dict[str, int] | None = None  # optional Mix'n'Match map applied at load (after default_bits)
    method: str = "rtn"
    method_args: dict[str, Any] = field(default_factory=dict)
    param_dtype: str = "float16"
    # input-side rotation of every quantized layer (quant/rotation.py), e.g. {"mode": "input", "kind": "hadamard",
    # "seed": 0}; None = no rotation. Optional: absent in older checkpoints, and not written when None, so a checkpoint
    # without rotation stays readable by matquant versions that predate the field.
    rotation: dict[str, Any] | None = None
    # the slices below the master that have their own group parameters (<module>.scales_int{r} / zeros_int{r},
    # fitted for `slicing`; `--slice-params own`), e.g. [2, 3, 4, 6]; None = every slice reads the shared ones.
    # Optional like `rotation`: not written when None; a matquant that predates it refuses such a checkpoint
    # ("unknown key(s) ['slice_params']") instead of reading the slices with the wrong parameters.
    slice_params: list[int] | None = None
    quant_method: str = QUANT_METHOD
    format_version: int = FORMAT_VERSION

    def validate(self) -> "QuantConfig":
        def fail(msg):
            raise CheckpointError(f"invalid quantization_config: {msg}")

        for key, types in (("modules", list), ("bits_map", (dict, type(None))), ("method_args", dict),
                           ("symmetric", bool), ("scope", (str, type(None))), ("method", str), ("slicing", str),
                           ("param_dtype", str), ("quant_method", str)):
            if not isinstance(getattr(self, key), types):
                fail(f"{key} has the wrong type ({type(getattr(self, key)).__name__}: {getattr(self, key)!r:.80})")
        if not isinstance(self.format_version, int) or isinstance(self.format_version, bool):
            fail(f"format_version must be an integer, got {self.format_version!r:.80}")
        if self.quant_method != QUANT_METHOD:
            fail(f"quant_method is {self.quant_method!r}, expected {QUANT_METHOD!r}")
        if self.format_version != FORMAT_VERSION:
            fail(f"format_version {self.format_version} is not supported by this matquant "
                 f"(supports {FORMAT_VERSION}); upgrade matquant or re-export the checkpoint")
        try:
            check_bits(self.master_bits, "master_bits")
            check_bits(self.default_bits, "default_bits")
            check_slicing(self.slicing)
            for k, b in (self.bits_map or {}).items():
                check_bits(b, f"bits_map[{k!r}]")
        except ValueError as e:
            fail(str(e))
        if self.default_bits > self.master_bits:
            fail(f"default_bits {self.default_bits} exceeds master_bits {self.master_bits}")
        if any(b > self.master_bits for b in (self.bits_map or {}).values()):
            fail(f"bits_map asks for more than master_bits {self.master_bits}")
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or \
                (self.group_size <= 0 and self.group_size != -1):
            fail(f"group_size must be a positive integer or -1 (per channel), got {self.group_size!r}")
        if self.param_dtype not in PARAM_DTYPES:
            fail(f"param_dtype {self.param_dtype!r} not in {PARAM_DTYPES}")
        if not self.modules or not all(isinstance(m, str) and m for m in self.modules):
            fail("modules must be a non-empty list of module names")
        if len(set(self.modules)) != len(self.modules):
            fail("modules lists a module twice")
        try:
            check_spec(self.rotation)
        except ValueError as e:
            fail(str(e))
        if self.slice_params is not None:
            sp = self.slice_params
            if not isinstance(sp, list) or not sp or any(isinstance(b, bool) or not isinstance(b, int) for b in sp) \
                    or len(set(sp)) != len(sp) or any(not 1 <= b < self.master_bits for b in sp):
                fail(f"slice_params must be a non-empty list of distinct slice bit-widths below master_bits "
                     f"{self.master_bits}, got {sp!r:.80}")
        return self

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("rotation", "slice_params"):
            if d[k] is None:
                del d[k]  # see the fields' comments
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        if not isinstance(d, dict):
            raise CheckpointError("quantization_config must be a JSON object")
        known = set(cls.__dataclass_fields__)
        missing = sorted(set(REQUIRED_KEYS) - set(d))
        if missing == ["slicing"]:
            raise CheckpointError(
                "quantization_config has no 'slicing': the codes cannot be read without knowing the slicing they "
                "were built for (older matquant wrote none and read them as 'paper'). Add \"slicing\": \"paper\" or "
                "\"slicing\": \"nested\" to quantization_config in config.json, as the checkpoint was built "
                "(`matquant quantize --slicing ...`; the quantize default was 'nested').")
        if missing:
            raise CheckpointError(f"quantization_config is missing required key(s) {missing}")
        unknown = sorted(set(d) - known)
        if unknown:
            raise CheckpointError(f"quantization_config has unknown key(s) {unknown}; written by a newer matquant?")
        return cls(**d).validate()
