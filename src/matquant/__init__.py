"""matquant: Matryoshka Quantization — one int8 checkpoint whose most-significant-bit slices are good int4/int3/int2
models, with per-layer precision (Mix'n'Match)."""
from matquant.algorithms import (Calibration, GPTQConfig, MatGPTQConfig, MethodConfig, OmniQuantConfig, QATConfig,
                                  RTNConfig, recipe_config)
from matquant.api import load, quantize
from matquant.format.checkpoint import load_checkpoint, save_checkpoint
from matquant.format.config import CheckpointError, QuantConfig
from matquant.nn import MatQuantLinear, average_bits, effective_bits, get_bits, set_backend, set_bits

__version__ = "0.1.0"

__all__ = ["load", "quantize", "MethodConfig", "RTNConfig", "GPTQConfig", "MatGPTQConfig", "OmniQuantConfig",
           "QATConfig", "Calibration", "recipe_config", "set_bits", "set_backend", "get_bits", "average_bits", "effective_bits", "MatQuantLinear",
           "QuantConfig", "CheckpointError", "load_checkpoint", "save_checkpoint", "__version__"]
try:  # register "matquant" with transformers' quantizer hooks (AutoModelForCausalLM.from_pretrained(DIR))
    from matquant.integrations import transformers as _hf  # noqa: F401
except ImportError:  # pragma: no cover - transformers missing or too old
    pass
