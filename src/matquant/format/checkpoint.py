"""The one-checkpoint format: an HF-style folder holding the int-c master codes of every quantized layer.

    DIR/config.json         the model config + "quantization_config" (see QuantConfig)
    DIR/model.safetensors   <module>.qweight (uint8 [out, in]), <module>.scales, <module>.zeros ([out, in/G]),
                            <module>.bias, and every non-quantized tensor (embeddings, norms, ...)
                            -- or, sharded as in HF, model-0000k-of-0000N.safetensors + model.safetensors.index.json
                            (format/shards.py); every reader here takes both layouts
    DIR/tokenizer*, generation_config.json

Tied tensors are stored once. Never pickle: only safetensors and JSON are read.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import torch

from matquant.format.atomic import atomic_dir
from matquant.format.config import CheckpointError, QuantConfig
from matquant.format.folder import (CONFIG_NAME, check_config_size, check_config_types, checkpoint_files,
                                    read_config, weight_map_of)
from matquant.format.shards import ShardWriter
from matquant.format.validate import check_weights, iter_tensors, read_headers
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


def save_checkpoint(model, tokenizer, out_dir, qconfig: QuantConfig, overwrite: bool = False,
                    max_shard_bytes: int | None = None) -> Path:
    """Write the checkpoint folder atomically; returns its path. `max_shard_bytes`: split the weights into HF-style
    shards of at most that size (format/shards.py); None: one model.safetensors."""
    qconfig.validate()
    missing = [m for m in qconfig.modules if not isinstance(model.get_submodule(m), MatQuantLinear)]
    if missing:
        raise CheckpointError(f"modules listed in the config are not MatQuantLinear: {missing[:3]}")
    from matquant.nn.quantized_embedding import has_quantized_embeddings

    if has_quantized_embeddings(model):
        raise CheckpointError("this model's embeddings and head were quantized to int8 at load "
                              "(quantize_embeddings=True), which a checkpoint does not store: load it with "
                              "quantize_embeddings=False to save it.")
    return write_checkpoint_folder(out_dir, model, tokenizer, qconfig, _dedup_state_dict(model).items(),
                                   overwrite=overwrite, max_shard_bytes=max_shard_bytes or 2**62)


def write_checkpoint_folder(out_dir, model, tokenizer, qconfig: QuantConfig, tensors, *, overwrite: bool = False,
                            max_shard_bytes: int = 2**62) -> Path:
    """The checkpoint folder, atomically: config.json (the model's config + `qconfig`), the (name, tensor) pairs of
    `tensors` (any iterable: the streamed pipeline yields them one block at a time) through ShardWriter, the
    generation config and the tokenizer."""
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        cfg = model.config.to_dict()
        cfg["quantization_config"] = qconfig.to_dict()
        cfg.pop("_name_or_path", None)
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, default=str) + "\n")
        # one metadata key (the format version lives in config.json's quantization_config)
        writer = ShardWriter(tmp, max_shard_bytes, metadata={"format": "pt"})
        try:
            for k, t in tensors:
                writer.add(k, t)
            writer.close()
        except BaseException:
            writer.abort()
            raise
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


def weight_headers(ckpt_dir) -> dict[Path, dict]:
    """{weight file: its header} of a checkpoint folder in either layout, every file and the index checked
    (format/folder.py, format/validate.py `read_headers`); no tensor data read."""
    _, files = checkpoint_files(ckpt_dir)
    return read_headers(files, weight_map_of(ckpt_dir))


def merged_header(headers: dict[Path, dict]) -> dict:
    """{tensor name: (dtype, shape)} over every weight file."""
    return {k: v for h in headers.values() for k, v in h.items()}


def load_state(model, ckpt_dir, qconfig: QuantConfig,
               on_layer: Callable[[str, MatQuantLinear], None] | None = None) -> None:
    """Load every tensor of the checkpoint into `model` (a meta skeleton), one at a time, each checked by
    format/validate.py. `on_layer(name, layer)` is called as soon as every tensor of a quantized layer is in (the
    streaming load packs it there and frees its master codes)."""
    _, files = checkpoint_files(ckpt_dir)
    headers = check_weights(files, model, qconfig, tied_keys(model), weight_map_of(ckpt_dir))
    expected = model.state_dict()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, MatQuantLinear)}
    pending = {n: {k for k in expected if k.startswith(n + ".")} for n in layers}
    for k, t in iter_tensors(headers, qconfig):
        if t.is_floating_point():
            t = t.to(expected[k].dtype)
        owner, _, leaf = k.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        errors: list[str] = []
        # this module's own tensor only (load_state_dict would also run its children's hooks, and a child already
        # packed with its master codes freed refuses any load)
        module._load_from_state_dict({leaf: t}, "", {"assign_to_params_buffers": True}, False, [], [], errors)
        if errors:
            raise CheckpointError(f"tensor {k} cannot be loaded: {errors[0].splitlines()[0][:200]}")
        del t
        if owner in pending:
            pending[owner].discard(k)
            if not pending[owner] and on_layer is not None:
                on_layer(owner, layers[owner])
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    dropped = {f"{n}.{leaf}" for n, m in layers.items() if m.master_dropped for leaf in m.code_tensor_names()}
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
            if t.is_meta and n not in dropped]
    if left:
        where = files[0] if len(files) == 1 else Path(ckpt_dir)
        raise CheckpointError(f"{where} does not provide {len(left)} tensor(s) of this model, e.g. {left[:3]}.")


def tied_keys(model) -> set[str]:
    """State-dict names stored once because they are tied to another (lm_head = embed_tokens)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    out = model.get_output_embeddings()
    if out is None:
        return set()
    return {f"{n}.weight" for n, m in model.named_modules() if m is out}  # named_modules lists a module once


def precheck(ckpt_dir) -> None:
    """Every check `load_checkpoint` makes before it builds anything (files, the shard index, config.json, the
    architecture config transformers would build, its size against the weights' headers), raising CheckpointError.
    Run by the transformers hook before transformers parses config.json itself, and by `matquant info`."""
    cfg, _ = read_quant_config(ckpt_dir)
    cfg_path, _ = checkpoint_files(ckpt_dir)
    check_config_size(cfg, merged_header(weight_headers(ckpt_dir)), cfg_path)
    hf_config(cfg, cfg_path)


def check_checkpoint(ckpt_dir) -> tuple[dict, QuantConfig, dict[Path, dict]]:
    """(config.json, qconfig, {weight file: header}) after every check `load_checkpoint` makes short of reading the
    tensors' values: files and index, config.json against the weights' headers, the model it describes built on the
    meta device (nothing allocated for weights), every tensor's name, shape and dtype against it."""
    cfg, qconfig = read_quant_config(ckpt_dir)
    headers = weight_headers(ckpt_dir)
    model = build_skeleton(cfg, qconfig, header=merged_header(headers))
    check_weights(list(headers), model, qconfig, tied_keys(model), weight_map_of(ckpt_dir))
    return cfg, qconfig, headers


def open_checkpoint(ckpt_dir, bits=None, slicing: str | None = None, dtype: torch.dtype = torch.float32):
    """(skeleton, qconfig): the checked model on the meta device, its precision already chosen (the stored default
    and bits map, then `bits`), ready for `load_state`."""
    cfg, qconfig = read_quant_config(ckpt_dir)
    model = build_skeleton(cfg, qconfig, dtype, header=merged_header(weight_headers(ckpt_dir)))
    set_bits(model, qconfig.default_bits, slicing or qconfig.slicing)
    try:
        if qconfig.bits_map:
            set_bits(model, qconfig.bits_map)
    except ValueError as e:
        raise CheckpointError(f"quantization_config.bits_map: {e}") from None
    if bits is not None:
        set_bits(model, bits)
    return model, qconfig


def load_checkpoint(ckpt_dir, bits=None, slicing: str | None = None, device: str = "cpu",
                    dtype: torch.dtype = torch.float32):
    """(model, tokenizer, qconfig). `bits` (int or map) overrides the stored default precision / bits map."""
    model, qconfig = open_checkpoint(ckpt_dir, bits, slicing, dtype)
    load_state(model, ckpt_dir, qconfig)
    model.to(device).eval()
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
    """Bytes of the weight file(s), either layout."""
    _, files = checkpoint_files(ckpt_dir)
    return sum(os.path.getsize(f) for f in files)
