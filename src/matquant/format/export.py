"""Export one precision of a matquant checkpoint as a plain (dequantized) HF model folder."""
from __future__ import annotations

from pathlib import Path

import torch

from matquant.format.atomic import atomic_dir
from matquant.format.checkpoint import tied_keys
from matquant.nn.bits import matquant_modules


def plain_state_dict(model) -> dict[str, torch.Tensor]:
    """State dict of the equivalent unquantized model at the current per-layer bits."""
    qmods = matquant_modules(model)
    skip = {f"{n}.{t}" for n, m in qmods.items() for t in m.code_tensor_names()}
    sd = {k: t for k, t in model.state_dict().items() if k not in skip}
    for n, m in qmods.items():
        sd[f"{n}.weight"] = m.dense_weight(torch.float32).detach().clone()  # an input rotation is folded back
    return sd


def export_dequantized(model, tokenizer, out_dir, dtype: torch.dtype = torch.float32, overwrite: bool = False) -> Path:
    """Write a stock-transformers folder (config.json without quantization_config + safetensors)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    cfg = model.config.__class__.from_dict({k: v for k, v in model.config.to_dict().items()
                                            if k != "quantization_config"})
    with no_init_weights():
        plain = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    sd = plain_state_dict(model)
    target = plain.state_dict()
    for k, v in list(sd.items()):
        if k in target and target[k].shape != v.shape and target[k].shape == v.t().shape:
            sd[k] = v.t().contiguous()  # HF Conv1D stores [in, out]
    missing, unexpected = plain.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v
                                                 for k, v in sd.items()}, strict=False)
    tied = tied_keys(plain)
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"export mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    plain.tie_weights()
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        plain.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(out_dir)
