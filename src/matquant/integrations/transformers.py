"""Register "matquant" with transformers so that `AutoModelForCausalLM.from_pretrained(DIR)` loads a matquant
checkpoint (after `import matquant`), with its MatQuantLinear layers ready for `matquant.set_bits`.

Uses transformers' public hooks `register_quantization_config` and `register_quantizer`, plus one pre-check
(`install_precheck`): transformers parses config.json before any quantizer hook runs, so a corrupt matquant folder
would fail inside transformers (JSONDecodeError, its dataclass validation, a default-size model built for a
quant_method that is no longer matquant, ...). `import matquant` therefore wraps `PreTrainedConfig.get_config_dict`:
for a LOCAL folder that is a matquant checkpoint (`format.folder.looks_like_matquant`) it first runs the checks
`matquant.load` runs (`format.checkpoint.precheck`), raising CheckpointError; every other path is passed through
untouched.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch
from transformers import PretrainedConfig
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from matquant.format import folder as F, validate as V
from matquant.format.checkpoint import build_model, merged_header, precheck, replace_skeleton, tied_keys, weight_headers
from matquant.format.config import QUANT_METHOD, CheckpointError, QuantConfig
from matquant.nn.bits import set_bits
from matquant.nn.linear import MatQuantLinear


class MatQuantHfConfig(QuantizationConfigMixin):
    """transformers-side view of matquant's QuantConfig (validated by it)."""

    def __init__(self, **kwargs):
        self.quant_method = QUANT_METHOD
        kwargs.pop("quant_method", None)
        self._qconfig = QuantConfig.from_dict({"quant_method": QUANT_METHOD, **kwargs})
        for k in QuantConfig.__dataclass_fields__:  # every field (to_dict leaves out rotation when None)
            setattr(self, k, getattr(self._qconfig, k))

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

    def validate_environment(self, *args, **kwargs):
        if not self.pre_quantized:
            raise ValueError("matquant cannot quantize on the fly inside from_pretrained; "
                             "run `matquant quantize --model ... --out DIR` and load DIR.")

    def update_attn_implementation(self, config):
        # The one hook that sees the config before transformers builds the model: for a local folder, run the same
        # pre-build checks as `matquant.load` (files are regular, no pickle, the config is no bigger than the
        # tensors in the file), so a hostile config.json is refused before any module is created.
        d = getattr(config, "_name_or_path", None)
        if d and Path(d).is_dir():
            cfg_path, _ = F.checkpoint_files(d)
            F.check_config_size(config.to_dict(), merged_header(weight_headers(d)), cfg_path)
            F.check_config_types(config.to_dict(), type(config)().to_dict(), cfg_path)
        with torch.device("meta"):  # a trial build (no memory): transformers' own errors become CheckpointError
            build_model(config)
        return super().update_attn_implementation(config)

    def _process_model_before_weight_loading(self, model, dtype=None, checkpoint_files=None, **kwargs):
        if not checkpoint_files:
            raise CheckpointError("transformers found no weights file for this matquant checkpoint; it needs "
                                  f"{F.WEIGHTS_NAME} or {F.INDEX_NAME} and its shards.")
        qconfig = self.quantization_config.qconfig
        replace_skeleton(model, qconfig, dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32)
        _skip_parent_init(model)
        # every tensor checked exactly as `matquant.load` checks it (one at a time), before transformers reads any
        files = [Path(f) for f in checkpoint_files]
        folder = files[0].parent
        weight_map = F.weight_map_of(folder) if files != [folder / F.WEIGHTS_NAME] else None
        headers = V.check_weights(files, model, qconfig, tied_keys(model), weight_map)
        for _ in V.iter_tensors(headers, qconfig):
            pass
        return model

    def get_new_dtype(self, converter, param, dtype):
        # keep codes (uint8) and the stored dtype of scales/zeros exactly as saved
        name = getattr(converter, "target_patterns", None) or getattr(converter, "source_patterns", None) or ""
        name = name[0] if isinstance(name, (list, tuple)) and name else str(name)
        if name.endswith(".qweight") or V.param_leaf(name.rpartition(".")[2]):
            return None
        return super().get_new_dtype(converter, param, dtype)

    def _process_model_after_weight_loading(self, model, **kwargs):
        q = self.quantization_config.qconfig
        set_bits(model, q.default_bits, q.slicing)
        try:
            if q.bits_map:
                set_bits(model, q.bits_map)
        except ValueError as e:
            raise CheckpointError(f"quantization_config.bits_map: {e}") from None
        return model

    def is_serializable(self, safe_serialization=None):
        return True

    @property
    def is_trainable(self) -> bool:
        return False


if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
    register_quantization_config(QUANT_METHOD)(MatQuantHfConfig)
if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
    register_quantizer(QUANT_METHOD)(MatQuantHfQuantizer)


def _skip_parent_init(model) -> None:
    """Keep transformers' weight init away from the parents of quantized layers.

    Some architectures' `_init_weights` reach into a child's `.weight` from the parent (GPT-2:
    ``init.normal_(module.c_proj.weight)`` on every attention/MLP block), which a MatQuantLinear does not have.
    Every tensor of a matquant checkpoint is loaded from the file, so such a parent has nothing left to initialise
    when it holds no parameter or buffer of its own: it is marked initialised. A parent that does hold its own
    tensors is left to transformers (its init would then fail loudly, not silently).
    """
    for module in model.modules():
        if any(isinstance(c, MatQuantLinear) for c in module.children()) and \
                not any(True for _ in module.parameters(recurse=False)) and \
                not any(True for _ in module.buffers(recurse=False)):
            module._is_hf_initialized = True


def install_precheck() -> None:
    """Wrap transformers' config reading with matquant's pre-checks for local matquant folders (idempotent)."""
    orig = PretrainedConfig.get_config_dict.__func__
    if getattr(orig, "_matquant_precheck", False):
        return

    @functools.wraps(orig)
    def get_config_dict(cls, pretrained_model_name_or_path, **kwargs):
        if F.looks_like_matquant(pretrained_model_name_or_path):  # never raises; False for hub ids
            precheck(pretrained_model_name_or_path)
        return orig(cls, pretrained_model_name_or_path, **kwargs)

    get_config_dict._matquant_precheck = True
    PretrainedConfig.get_config_dict = classmethod(get_config_dict)


install_precheck()
