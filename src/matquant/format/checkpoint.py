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
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from matquant.format.atomic import atomic_dir
from matquant.format.config import FORMAT_VERSION, CheckpointError, QuantConfig
from matquant.nn.bits import set_bits
from matquant.nn.linear import MatQuantLinear
from matquant.nn.replace import set_submodule
from matquant.quant.minmax import resolve_group_size

WEIGHTS_NAME = "model.safetensors"
CODE_TENSORS = ("qweight", "scales", "zeros")


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
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str) + "\n")
        save_file(_dedup_state_dict(model), str(tmp / WEIGHTS_NAME),
                  metadata={"format": "pt", "matquant_format_version": str(FORMAT_VERSION)})
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def read_quant_config(ckpt_dir) -> tuple[dict, QuantConfig]:
    d = Path(ckpt_dir)
    if not d.is_dir():
        raise CheckpointError(f"{ckpt_dir} is not a folder; pass a matquant checkpoint folder (from `matquant quantize`).")
    cfg_path = d / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{ckpt_dir} has no config.json: not a matquant checkpoint.")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); the file is corrupt.") from None
    if "quantization_config" not in cfg:
        raise CheckpointError(f"{cfg_path} has no quantization_config: this is a plain model, not a matquant "
                              "checkpoint. Quantize it with `matquant quantize --model DIR`.")
    return cfg, QuantConfig.from_dict(cfg["quantization_config"])


def _open_weights(d: Path):
    wpath = d / WEIGHTS_NAME
    if not wpath.exists():
        pickles = [p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl")]
        hint = f" (found pickle file(s) {pickles}; matquant never loads pickle)" if pickles else ""
        raise CheckpointError(f"{d} has no {WEIGHTS_NAME}{hint}.")
    try:
        return safe_open(str(wpath), framework="pt", device="cpu")
    except (SafetensorError, OSError, Exception) as e:
        raise CheckpointError(f"{wpath} is corrupt or truncated ({e}); re-create the checkpoint.") from None


def build_skeleton(cfg: dict, qconfig: QuantConfig, dtype=torch.float32):
    """The model with its quantized layers as (empty) MatQuantLinear, no weights loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    cfg = {k: v for k, v in cfg.items() if k != "quantization_config"}
    model_type = cfg.pop("model_type", None)
    if model_type is None:
        raise CheckpointError("config.json has no model_type")
    hf_cfg = AutoConfig.for_model(model_type, **cfg)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    replace_skeleton(model, qconfig, dtype)
    return model


def replace_skeleton(model, qconfig: QuantConfig, dtype=torch.float32, device=None) -> None:
    from matquant.models.targets import linear_weight

    for name in qconfig.modules:
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"quantized module {name!r} does not exist in this architecture.") from None
        out_f, in_f = linear_weight(old).shape
        gs = resolve_group_size(in_f, qconfig.group_size)
        new = MatQuantLinear(in_f, out_f, bias=getattr(old, "bias", None) is not None, group_size=gs,
                             master_bits=qconfig.master_bits, slicing=qconfig.slicing,
                             param_dtype=getattr(torch, qconfig.param_dtype), dtype=dtype, device=device)
        set_submodule(model, name, new)


def load_state(model, ckpt_dir, qconfig: QuantConfig) -> None:
    """Load and strictly validate every tensor of the checkpoint into `model`."""
    d = Path(ckpt_dir)
    expected = model.state_dict()
    with _open_weights(d) as f:
        keys = set(f.keys())
        tied = _tied_keys(model)
        missing = [k for k in expected if k not in keys and k not in tied]
        if missing:
            raise CheckpointError(f"{d / WEIGHTS_NAME} is missing {len(missing)} tensor(s), e.g. {missing[:3]}.")
        unexpected = sorted(keys - set(expected))
        if unexpected:
            raise CheckpointError(f"{d / WEIGHTS_NAME} has tensor(s) this model does not use, e.g. {unexpected[:3]}.")
        sd = {}
        for k in keys:
            try:
                t = f.get_tensor(k)
            except Exception as e:  # truncated data region
                raise CheckpointError(f"tensor {k} in {d / WEIGHTS_NAME} cannot be read ({e}); file truncated?") from None
            ref = expected[k]
            if tuple(t.shape) != tuple(ref.shape):
                raise CheckpointError(f"tensor {k} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}.")
            leaf = k.rsplit(".", 1)[-1]
            if leaf == "qweight" and t.dtype != torch.uint8:
                raise CheckpointError(f"tensor {k} has dtype {t.dtype}, expected torch.uint8 codes.")
            if leaf == "qweight" and int(t.max()) >= 2**qconfig.master_bits:
                raise CheckpointError(f"tensor {k} holds codes >= 2^{qconfig.master_bits} (master_bits).")
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise CheckpointError(f"tensor {k} contains NaN/Inf values.")
            sd[k] = t.to(ref.dtype) if (t.is_floating_point() and ref.is_floating_point()) else t
    model.load_state_dict(sd, strict=False, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()


def _tied_keys(model) -> set[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    out = model.get_output_embeddings()
    if out is None:
        return set()
    names = [n for n, m in model.named_modules() if m is out]
    return {f"{names[0]}.weight"} if names else set()


def load_checkpoint(ckpt_dir, bits=None, slicing: str | None = None, device: str = "cpu",
                    dtype: torch.dtype = torch.float32):
    """(model, tokenizer, qconfig). `bits` (int or map) overrides the stored default precision / bits map."""
    from transformers import AutoTokenizer

    cfg, qconfig = read_quant_config(ckpt_dir)
    model = build_skeleton(cfg, qconfig, dtype)
    load_state(model, ckpt_dir, qconfig)
    model.to(device).eval()
    set_bits(model, qconfig.default_bits, slicing or qconfig.slicing)
    if qconfig.bits_map:
        set_bits(model, qconfig.bits_map)
    if bits is not None:
        set_bits(model, bits)
    tok = None
    if any(Path(ckpt_dir, n).exists() for n in ("tokenizer.json", "tokenizer_config.json")):
        tok = AutoTokenizer.from_pretrained(str(ckpt_dir))
    return model, tok, qconfig


def checkpoint_size_bytes(ckpt_dir) -> int:
    return os.path.getsize(Path(ckpt_dir) / WEIGHTS_NAME)
