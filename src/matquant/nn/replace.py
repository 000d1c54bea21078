"""Swap nn.Linear / Conv1D modules for MatQuantLinear."""
from __future__ import annotations

from torch import nn

from matquant.models.targets import is_linear_like
from matquant.nn.linear import MatQuantLinear
from matquant.quant.minmax import QuantizedWeight
from matquant.quant.slicing import DEFAULT_SLICING


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def replace_with_matquant(model: nn.Module, qweights: dict[str, QuantizedWeight], slicing: str = DEFAULT_SLICING) -> None:
    for name, qw in qweights.items():
        old = model.get_submodule(name)
        if isinstance(old, MatQuantLinear):
            continue
        if not is_linear_like(old):
            raise TypeError(f"{name} is a {type(old).__name__}, not a linear layer")
        dtype = old.weight.dtype if old.weight.is_floating_point() else None
        new = MatQuantLinear.from_quantized(qw, getattr(old, "bias", None), slicing=slicing, dtype=dtype)
        set_submodule(model, name, new)
