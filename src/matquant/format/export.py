"""Export one precision of a matquant checkpoint as a plain (dequantized) HF model folder, written a tensor at a time:
from a model in memory, or from an export source (integrations/export_slices.py `CheckpointSource`: the checkpoint
read one tensor at a time), through format/shards.py's ShardWriter (sharded as HF does, or one model.safetensors)."""
from __future__ import annotations

from pathlib import Path

import torch

from matquant.format.atomic import atomic_dir
from matquant.format.checkpoint import tied_keys
from matquant.format.shards import ShardWriter
from matquant.nn.bits import matquant_modules


def plain_state_dict(model) -> dict[str, torch.Tensor]:
    """State dict of the equivalent unquantized model at the current per-layer bits."""
    qmods = matquant_modules(model)
    skip = {f"{n}.{t}" for n, m in qmods.items() for t in m.code_tensor_names()}
    sd = {k: t for k, t in model.state_dict().items() if k not in skip}
    for n, m in qmods.items():
        sd[f"{n}.weight"] = m.dense_weight(torch.float32).detach().clone()  # an input rotation is folded back
    return sd


def plain_model_skeleton(config, dtype: torch.dtype):
    """The stock transformers model of `config` (its quantization_config dropped) on the meta device: the names,
    shapes, tied keys and config files of the exported folder, no memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    cfg = config.__class__.from_dict({k: v for k, v in config.to_dict().items() if k != "quantization_config"})
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype)


def save_plain_config(plain, folder, dtype: torch.dtype) -> None:
    """config.json (dtype and architecture of the stock model `plain`) and, for a generative model,
    generation_config.json into `folder`: what every exported transformers folder starts with."""
    plain.config.dtype = str(dtype).split(".")[1]
    plain.config.architectures = [plain.__class__.__name__]
    plain.config.save_pretrained(folder)
    if plain.can_generate():
        plain.generation_config.save_pretrained(folder)


def dense_tensor_getter(model_or_source):
    """(names, get): every tensor of the dequantized model by name, fetched one at a time from an export source
    (`dense_weight(module)` / `plain(name)`), or from a model in memory."""
    src = model_or_source
    if hasattr(src, "dense_weight") and hasattr(src, "plain"):
        weights = {f"{n}.weight": n for n in src.slice_names}
        names = list(src.plain_names) + list(weights)
        return names, lambda k: src.dense_weight(weights[k]) if k in weights else src.plain(k)
    sd = plain_state_dict(src)
    return list(sd), sd.__getitem__


def export_dequantized(model, tokenizer, out_dir, dtype: torch.dtype = torch.float32, overwrite: bool = False,
                       max_shard_bytes: int | None = None) -> Path:
    """Write a stock-transformers folder (config.json without quantization_config + safetensors) of `model` (a
    model in memory or an export source, then `tokenizer` may be None: the source's own), one tensor at a time.
    `max_shard_bytes`: HF-style shards of at most that size; None: one model.safetensors."""
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    config = model.config
    plain = plain_model_skeleton(config, dtype)
    target = plain.state_dict()
    tied = tied_keys(plain)
    names, get = dense_tensor_getter(model)
    have = set(names)
    missing = [k for k in target if k not in have and k not in tied]
    unexpected = [k for k in names if k not in target]
    if missing or unexpected:
        raise RuntimeError(f"export mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        save_plain_config(plain, tmp, dtype)
        writer = ShardWriter(tmp, max_shard_bytes or 2**62, metadata={"format": "pt"})
        try:
            for k in target:
                if k in tied:
                    continue  # stored once, as transformers' save_pretrained does
                v = get(k)
                if target[k].shape != v.shape and target[k].shape == v.t().shape:
                    v = v.t()  # HF Conv1D stores [in, out]
                writer.add(k, v.to(dtype).to(target[k].dtype) if v.is_floating_point() else v)
                del v
            writer.close()
        except BaseException:
            writer.abort()
            raise
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)
