"""Register "matquant" with transformers so that `AutoModelForCausalLM.from_pretrained(DIR)` loads a matquant
checkpoint (after `import matquant`), with its MatQuantLinear layers ready for `matquant.set_bits`.

Uses transformers' public hooks `register_quantization_config` and `register_quantizer`.
"""
from __future__ import annotations

from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from matquant.format.config import QUANT_METHOD, QuantConfig


class MatQuantHfConfig(QuantizationConfigMixin):
    """transformers-side view of matquant's QuantConfig (validated by it)."""

    def __init__(self, **kwargs):
        self.quant_method = QUANT_METHOD
        kwargs.pop("quant_method", None)
        self._qconfig = QuantConfig.from_dict({"quant_method": QUANT_METHOD, **kwargs})
        for k, v in self._qconfig.to_dict().items():
            setattr(self, k, v)

    @property
    def qconfig(self) -> QuantConfig:
        return QuantConfig.from_dict({k: getattr(self, k) for k in QuantConfig.__dataclass_fields__})

    def to_dict(self):
        return self.qconfig.to_dict()

    def to_diff_dict(self):
        return self.to_dict()


class MatQuantHfQuantizer(HfQuantizer):
    """Pre-quantized loading only: matquant checkpoints are produced by `matquant quantize`."""

    requires_calibration = True

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)

    def validate_environment(self, *args, **kwargs):
        if not self.pre_quantized:
            raise ValueError("matquant cannot quantize on the fly inside from_pretrained; "
                             "run `matquant quantize --model ... --out DIR` and load DIR.")

    def _process_model_before_weight_loading(self, model, dtype=None, **kwargs):
        import torch

        from matquant.format.checkpoint import replace_skeleton

        replace_skeleton(model, self.quantization_config.qconfig, dtype=dtype or torch.float32)
        return model

    def get_new_dtype(self, converter, param, dtype):
        # keep codes (uint8) and the stored dtype of scales/zeros exactly as saved
        name = getattr(converter, "target_patterns", None) or getattr(converter, "source_patterns", None) or ""
        name = name[0] if isinstance(name, (list, tuple)) and name else str(name)
        if name.endswith((".qweight", ".scales", ".zeros")):
            return None
        return super().get_new_dtype(converter, param, dtype)

    def _process_model_after_weight_loading(self, model, **kwargs):
        from matquant.nn.bits import set_bits

        q = self.quantization_config.qconfig
        set_bits(model, q.default_bits, q.slicing)
        if q.bits_map:
            set_bits(model, q.bits_map)
        return model

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def _register():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(MatQuantHfConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(MatQuantHfQuantizer)


_register()
