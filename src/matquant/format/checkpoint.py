"""The one-checkpoint format: an HF-style folder holding the int-c master codes of every quantized layer.

    DIR/config.json         the model config + "quantization_config" (see QuantConfig)
    DIR/model.safetensors   <module>.qweight (uint8 [out, in]), <module>.scales, <module>.zeros ([out, in/G]),
                            <module>.bias, and every non-quantized tensor (embeddings, norms, ...)
    DIR/tokenizer*, generation_config.json

Tied tensors are stored once. Never pickle: only safetensors and JSON are read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from matquant.format.atomic import atomic_dir
from matquant.format.config import CheckpointError, QuantConfig
from matquant.format.folder import (CONFIG_NAME, WEIGHTS_NAME, check_config_size, check_config_types, checkpoint_files,
                                    read_config)
from matquant.format.validate import read_header, validate_tensors
from matquant.nn.bits import set_bits
from matquant.nn.linear import MatQuantLinear
from matquant.nn.replace import set_submodule
from matquant.quant.minmax import resolve_group_size


def _dedup_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    seen: dict[tuple, str] = {}
    out = {}
    for k, t in model.state_dict().items():
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.device.type)
        if t.numel() and key in seen:
            continue  # tied weight (e.g. lm_head = embed_tokens); transformers re-ties on load
        seen[key] = k
        out[k] = t.detach().contiguous().cpu()
    return out


def state_dict_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's tensors as stored (tied tensors counted once)."""
    return sum(t.numel() * t.element_size() for t in _dedup_state_dict(model).values())


def save_checkpoint(model, tokenizer, out_dir, qconfig: QuantConfig, overwrite: bool = False) -> Path:
    """Write the checkpoint folder atomically; returns its path."""
    qconfig.validate()
    missing = [m for m in qconfig.modules if not isinstance(model.get_submodule(m), MatQuantLinear)]
    if missing:
        raise CheckpointError(f"modules listed in the config are not MatQuantLinear: {missing[:3]}")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        cfg = model.config.to_dict()
        cfg["quantization_config"] = qconfig.to_dict()
        cfg.pop("_name_or_path", None)
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, default=str) + "\n")
        # one metadata key: safetensors writes several in hash order, so two identical saves differed in their bytes
        # (the format version lives in config.json's quantization_config)
        save_file(_dedup_state_dict(model), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def read_quant_config(ckpt_dir) -> tuple[dict, QuantConfig]:
    """(config.json as a dict, its validated QuantConfig); checks the folder's files first (see format/validate.py)."""
    cfg_path, _ = checkpoint_files(ckpt_dir)
    cfg = read_config(cfg_path)
    return cfg, QuantConfig.from_dict(cfg["quantization_config"])


def hf_config(cfg: dict, path=CONFIG_NAME):
    """The transformers config of a checkpoint's config.json; anything transformers refuses is a CheckpointError."""
    from transformers import AutoConfig

    cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    model_type = cfg.pop("model_type", None)
    if not isinstance(model_type, str):
        raise CheckpointError(f"{path} has no model_type (or not a string); the file is corrupt.")
    try:
        defaults = AutoConfig.for_model(model_type).to_dict()
    except Exception as e:  # an unknown model_type
        raise CheckpointError(f"{path} is not a valid {model_type!r} config: {_one_line(e)}") from None
    check_config_types(cfg, defaults, path)
    try:
        return AutoConfig.for_model(model_type, **cfg)
    except Exception as e:  # the input decides what transformers raises: ValueError, TypeError, KeyError, ...
        raise CheckpointError(f"{path} is not a valid {model_type!r} config: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:300] if text else ''}"


def build_skeleton(cfg: dict, qconfig: QuantConfig, dtype=torch.float32, header=None):
    """The model with its quantized layers as MatQuantLinear, every parameter on the meta device (nothing allocated
    for weights; buffers such as rotary tables are real). `header` (of the weights file) bounds the config's size."""
    from accelerate import init_empty_weights

    if header is not None:
        check_config_size(cfg, header)
    with init_empty_weights(include_buffers=False):
        model = build_model(hf_config(cfg), dtype)
    replace_skeleton(model, qconfig, dtype, device="meta")
    return model


def build_model(hf_cfg, dtype=torch.float32):
    """transformers' model for `hf_cfg` (in the caller's device context); a config transformers cannot build a
    model from (a negative size, an unknown rope type, heads not dividing the width, ...) is a CheckpointError."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    try:
        with no_init_weights():  # every weight is loaded afterwards: random init is wasted work
            return AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    except Exception as e:  # the input decides what transformers raises: KeyError, RuntimeError, ValueError, ...
        raise CheckpointError(f"config.json describes a model transformers cannot build: {_one_line(e)}") from None


def replace_skeleton(model, qconfig: QuantConfig, dtype=torch.float32, device=None) -> None:
    from matquant.models.targets import linear_weight

    for name in qconfig.modules:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"quantized module {name!r} does not exist in this architecture.") from None
        try:
            out_f, in_f = linear_weight(old).shape
        except Exception:
            raise CheckpointError(f"quantized module {name!r} is a {type(old).__name__}, not a linear layer.") from None
        try:
            gs = resolve_group_size(in_f, qconfig.group_size)
        except ValueError as e:
            raise CheckpointError(f"quantization_config: {e}") from None
        new = MatQuantLinear(in_f, out_f, bias=getattr(old, "bias", None) is not None, group_size=gs,
                             master_bits=qconfig.master_bits, slicing=qconfig.slicing,
                             param_dtype=getattr(torch, qconfig.param_dtype), dtype=dtype, device=device)
        if qconfig.slice_params:
            new.add_slice_params(qconfig.slice_params)
        try:
            new.set_rotation(qconfig.rotation)  # the online input transform, rebuilt from the stored spec
        except ValueError as e:
            raise CheckpointError(f"quantization_config.rotation, module {name!r}: {e}") from None
        set_submodule(model, name, new)


def load_state(model, ckpt_dir, qconfig: QuantConfig) -> None:
    """Load every tensor of the checkpoint into `model` (a meta skeleton), each checked by format/validate.py."""
    _, wpath = checkpoint_files(ckpt_dir)
    sd = validate_tensors(wpath, model, qconfig, tied_keys(model))
    expected = model.state_dict()
    sd = {k: t.to(expected[k].dtype) if t.is_floating_point() else t for k, t in sd.items()}
    model.load_state_dict(sd, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"{wpath} does not provide {len(left)} tensor(s) of this model, e.g. {left[:3]}.")


def tied_keys(model) -> set[str]:
    """State-dict names stored once because they are tied to another (lm_head = embed_tokens)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    out = model.get_output_embeddings()
    if out is None:
        return set()
    return {f"{n}.weight" for n, m in model.named_modules() if m is out}  # named_modules lists a module once


def precheck(ckpt_dir) -> None:
    """Every check `load_checkpoint` makes before it builds anything (files, config.json, the architecture config
    transformers would build, its size against the weights header), raising CheckpointError. Run by the
    transformers hook before transformers parses config.json itself."""
    cfg, _ = read_quant_config(ckpt_dir)
    cfg_path, wpath = checkpoint_files(ckpt_dir)
    check_config_size(cfg, read_header(wpath), cfg_path)
    hf_config(cfg, cfg_path)


def load_checkpoint(ckpt_dir, bits=None, slicing: str | None = None, device: str = "cpu",
                    dtype: torch.dtype = torch.float32):
    """(model, tokenizer, qconfig). `bits` (int or map) overrides the stored default precision / bits map."""
    cfg, qconfig = read_quant_config(ckpt_dir)
    _, wpath = checkpoint_files(ckpt_dir)
    model = build_skeleton(cfg, qconfig, dtype, header=read_header(wpath))
    load_state(model, ckpt_dir, qconfig)
    model.to(device).eval()
    set_bits(model, qconfig.default_bits, slicing or qconfig.slicing)
    try:
        if qconfig.bits_map:
            set_bits(model, qconfig.bits_map)
    except ValueError as e:
        raise CheckpointError(f"quantization_config.bits_map: {e}") from None
    if bits is not None:
        set_bits(model, bits)
    return model, load_tokenizer(ckpt_dir), qconfig


def load_tokenizer(ckpt_dir):
    """The checkpoint's tokenizer, or None when it has none; unreadable tokenizer files are a CheckpointError."""
    from transformers import AutoTokenizer

    if not any(Path(ckpt_dir, n).exists() for n in ("tokenizer.json", "tokenizer_config.json")):
        return None
    try:
        return AutoTokenizer.from_pretrained(str(ckpt_dir))
    except Exception as e:
        raise CheckpointError(f"the tokenizer files in {ckpt_dir} cannot be loaded ({_one_line(e)}); copy them "
                              "again from the source model.") from None


def checkpoint_size_bytes(ckpt_dir) -> int:
    return os.path.getsize(Path(ckpt_dir) / WEIGHTS_NAME)
