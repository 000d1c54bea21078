"""Compiled decoding on CPU: `torch.compile` of a causal LM's forward with a static KV cache.

In eager mode a batch-1 decode step of a small model is mostly Python and small-op overhead (transformers'
attention, norms, rotary, cache bookkeeping and the casts around each quantized matmul; docs/benchmarks.md, "CPU
runtime"). With a static KV cache every decode step has the same shapes, so inductor compiles the whole forward
once per (prompt length, total length) into fused C++ loops around the packed int4 kernels, which it calls as
extern ops; the first generation at a new shape pays the compilation (minutes). Measurements: docs/benchmarks.md,
"CPU runtime at 2 threads on an idle machine, and compiled decoding".

The compiled graph captures the layers' packed slices as they are when it is traced, so the precision is fixed:
`set_bits` on a compiled model is refused (reload, or compile after switching).
"""
from __future__ import annotations

from torch import nn

COMPILED_FLAG = "_matquant_compiled_decode"


def compile_decode(model: nn.Module) -> nn.Module:
    """Compile `model` (a transformers causal LM) for generation in place and return it; idempotent."""
    import torch

    if getattr(model, COMPILED_FLAG, False):
        return model
    if not hasattr(model, "generation_config"):
        raise ValueError("compile_decode needs a transformers causal LM (a model with a generation_config).")
    model.generation_config.cache_implementation = "static"  # same shapes every decode step
    model.forward = torch.compile(model.forward, dynamic=False)
    setattr(model, COMPILED_FLAG, True)
    return model


def is_compiled(model: nn.Module) -> bool:
    return bool(getattr(model, COMPILED_FLAG, False))


__all__ = ["compile_decode", "is_compiled"]
