"""Activation checkpointing for QAT (`--activation-checkpointing`): each decoder block keeps only its input for
backward and recomputes its activations there (transformers' gradient checkpointing, non-reentrant
`torch.utils.checkpoint`: it works with frozen embeddings, DDP and FSDP2, and restores the RNG state so dropout
recomputes identically). Less memory for one more forward per block per backward."""
from __future__ import annotations

from contextlib import contextmanager

from torch import nn


def check_activation_checkpointing(model: nn.Module) -> None:
    """A clear error for a model that cannot checkpoint its blocks."""
    if not getattr(model, "supports_gradient_checkpointing", False) or _api(model) is None:
        raise ValueError(f"--activation-checkpointing: {type(model).__name__} does not support gradient "
                         "checkpointing (transformers' supports_gradient_checkpointing is off for it); run without "
                         "--activation-checkpointing.")


@contextmanager
def activation_checkpointing(model: nn.Module, enabled: bool):
    """Checkpoint every decoder block inside the block (if `enabled`); the model's own setting afterwards."""
    if not enabled:
        yield
        return
    check_activation_checkpointing(model)
    enable, disable, is_on = _api(model)
    was_on = bool(getattr(model, is_on, False))
    had_input_hook = _has_input_hook(model)
    if not was_on:
        enable({"use_reentrant": False})
    try:
        yield
    finally:
        if not was_on:
            disable()
            # (enabling also hooks the input embeddings to require grad; disabling leaves that hook: remove it)
            if not had_input_hook and _has_input_hook(model) and \
                    callable(getattr(model, "disable_input_require_grads", None)):
                model.disable_input_require_grads()


def _has_input_hook(model: nn.Module) -> bool:
    return bool(getattr(model, "_require_grads_hooks", None)) or hasattr(model, "_require_grads_hook")


def _api(model: nn.Module):
    """(enable(kwargs), disable(), name of the is-on property) of transformers 5 (activation_*) or 4 (gradient_*)."""
    for kind in ("activation", "gradient"):
        on, off = getattr(model, f"{kind}_checkpointing_enable", None), getattr(model, f"{kind}_checkpointing_disable",
                                                                               None)
        if callable(on) and callable(off):
            return (lambda kw, on=on: on(kw)), off, f"is_{kind}_checkpointing"
    return None
