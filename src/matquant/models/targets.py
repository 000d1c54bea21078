"""Find the linear layers to quantize, by role (FFN / attention), for the supported architectures."""
from __future__ import annotations

import re

from torch import nn

# model_type -> (FFN leaf names, attention leaf names). Parent module names disambiguate GPT-2's two c_proj.
ROLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "llama": (("gate_proj", "up_proj", "down_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")),
    "mistral": (("gate_proj", "up_proj", "down_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")),
    "qwen2": (("gate_proj", "up_proj", "down_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")),
    "qwen3": (("gate_proj", "up_proj", "down_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")),
    "gemma2": (("gate_proj", "up_proj", "down_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")),
    "gemma3_text": (("gate_proj", "up_proj", "down_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")),
    "gemma3": (("gate_proj", "up_proj", "down_proj"), ("q_proj", "k_proj", "v_proj", "o_proj")),
    "gpt2": (("c_fc", "c_proj"), ("c_attn", "c_proj")),
    "gpt_neox": (("dense_h_to_4h", "dense_4h_to_h"), ("query_key_value", "dense")),
    "opt": (("fc1", "fc2"), ("q_proj", "k_proj", "v_proj", "out_proj")),
}
FFN_PARENTS = ("mlp", "feed_forward", "ffn")
ATTN_PARENTS = ("self_attn", "attn", "attention")
SCOPES = ("ffn", "attn", "ffn+attn")


def is_linear_like(m: nn.Module) -> bool:
    """nn.Linear or HF's Conv1D (GPT-2), whose weight is stored transposed [in, out]."""
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _model_type(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return getattr(cfg, "model_type", None) or type(model).__name__


def find_targets(model: nn.Module, scope: str = "ffn", modules: str | None = None) -> list[str]:
    """Names of the linear layers to quantize.

    `modules` (a regex, full match on the module name) overrides role discovery and works for any architecture.
    Otherwise the model's type must be one of `ROLES`; `scope` picks FFN, attention or both.
    The embedding and LM head are never targets.
    """
    linear_names = [n for n, m in model.named_modules() if is_linear_like(m)]
    if modules is not None:
        try:
            rx = re.compile(modules)
        except re.error as e:
            raise ValueError(f"--modules {modules!r} is not a valid regular expression: {e}") from None
        names = [n for n in linear_names if rx.fullmatch(n)]
        if not names:
            raise ValueError(f"--modules {modules!r} matches none of the model's linear layers, e.g. "
                             f"{linear_names[:3]}.")
        return names
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}; choose one of {', '.join(SCOPES)}.")
    mtype = _model_type(model)
    if mtype not in ROLES:
        raise ValueError(
            f"architecture {mtype!r} is not supported for role discovery (supported: {', '.join(sorted(ROLES))}). "
            "Name the layers yourself with --modules REGEX (Python: modules=...), e.g. "
            "--modules '.*\\.mlp\\.(gate|up|down)_proj'."
        )
    ffn_leaves, attn_leaves = ROLES[mtype]
    out = []
    for n in linear_names:
        parts = n.split(".")
        if len(parts) < 2:
            continue
        parent, leaf = parts[-2], parts[-1]
        in_ffn = leaf in ffn_leaves and (parent in FFN_PARENTS or mtype == "opt")
        in_attn = leaf in attn_leaves and parent in ATTN_PARENTS
        if ("ffn" in scope and in_ffn) or ("attn" in scope and in_attn):
            out.append(n)
    if not out:
        raise ValueError(f"found no {scope} linear layers in this {mtype} model; use --modules REGEX.")
    return out


def linear_weight(m: nn.Module):
    """The [out, in] weight of a Linear or Conv1D."""
    w = m.weight
    return w.t() if type(m).__name__ == "Conv1D" else w


def layer_index(name: str) -> int | None:
    """Transformer block index from a module name like 'model.layers.12.mlp.up_proj' (None if absent)."""
    m = re.search(r"\.(?:layers|h|layer|blocks)\.(\d+)\.", name)
    return int(m.group(1)) if m else None
