"""The backend interface: one object per layer that runs its forward and holds what it derived for it.

A backend reads its layer only through the layer's public surface (`MatQuantLinear`): ``bits``, ``slicing``,
``master_bits``, ``group_size``, ``in_features``, ``out_features``, ``bias``, ``scales`` (for its device),
``cache_dequantized``, ``master_planes``, ``master_dropped``, ``master_codes()``, ``group_params(bits, mode)``,
``dequantized_weight(dtype)`` (the reference slice, cached by the layer) and ``restore_master()``. What it derives
(dequantized weights, packed slices, kernel parameters) is its own, never saved, and listed by
``resident_tensors()`` for the memory accounting (`matquant.nn.memory`).

`Backend` itself is the reference path ('torch'); the others subclass it and fall back to it
(`Backend.forward`) for calls their kernel cannot take.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch

from matquant.kernels import torch_ref
from matquant.kernels.cpu_packed import HIGH_FORMATS
from matquant.quant.minmax import check_bits

LAYOUTS = ("master", "packed")  # 'packed' (a chunked 2|2|4 copy of the codes for Triton) was removed: see updated()
_warned: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class BackendOptions:
    """The settings of the backends (each reads its own); kept across `set_backend` calls unless given again."""

    cache_precisions: int = 1  # cpu/triton: dequantized weights kept per layer (switching among them is free)
    keep: tuple[int, ...] = ()  # packed: precisions kept packed side by side
    high_format: str = "int4x2"  # packed: r > 4 as two 4-bit planes ('int4x2') or a bf16 weight ('bf16')

    def updated(self, cache_precisions=None, layout=None, keep=None, high_format=None) -> "BackendOptions":
        """These options with the given (non-None) ones replaced, each checked (a clear ValueError if wrong).
        `layout` is accepted for compatibility only: the Triton kernel reads the uint8 master codes whatever it is
        (same outputs; 'packed' warns once)."""
        changes = {}
        if keep is not None:
            keep = tuple(sorted({int(b) for b in keep}))
            for b in keep:
                check_bits(b, "keep bits")
            changes["keep"] = keep
        if high_format is not None:
            if high_format not in HIGH_FORMATS:
                raise ValueError(f"unknown high_format {high_format!r}; choose one of {', '.join(HIGH_FORMATS)}.")
            changes["high_format"] = high_format
        if cache_precisions is not None:
            if isinstance(cache_precisions, bool) or not isinstance(cache_precisions, int) or cache_precisions < 0:
                raise ValueError(f"cache_precisions must be an integer >= 0, got {cache_precisions!r}.")
            changes["cache_precisions"] = cache_precisions
        if layout is not None:
            if layout not in LAYOUTS:
                raise ValueError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}.")
            if layout == "packed":
                warn_once(("layout", "packed"), "set_backend(layout='packed') is ignored: the chunked 2|2|4 copy "
                          "of the codes was removed (one packed master layout, docs/kernels.md); the triton backend "
                          "reads the uint8 master codes, with the same outputs. This warning is shown once.",
                          FutureWarning)
        return replace(self, **changes)


def warn_once(key: tuple[str, str], message: str, category: type[Warning] = RuntimeWarning) -> None:
    """Warn `message` once per `key` (until `reset_warnings`)."""
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, category, stacklevel=4)


def warn_fallback(backend: str, reason: str) -> None:
    warn_once((backend, reason), f"matquant {backend} backend cannot handle {reason}; falling back to the reference "
              "torch path (correct but slower). This warning is shown once.")


def reset_warnings() -> None:
    _warned.clear()


class Backend:
    """The reference path ('torch'): the layer's dequantized slice (cached by the layer), dense matmul."""

    name = "torch"

    def __init__(self, options: BackendOptions | None = None):
        self.options = options or BackendOptions()

    def prepare(self, layer, bits: int, mode: str) -> None:
        """Build now what a forward at (bits, mode) needs (instead of at that forward)."""

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return torch_ref.linear(x, layer.dequantized_weight(x.dtype), bias)

    def resident_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) of every tensor this backend holds for its layer."""
        return iter(())

    def resident_precisions(self) -> list[tuple[int, str]]:
        """The (bits, mode) this backend can run without the master codes."""
        return []

    def clear(self) -> None:
        """Drop everything derived (after the layer's codes, device or group parameters changed)."""

    def drop_dense_weights(self) -> None:
        """Drop the dense weights derived for fallback paths (the master codes are being freed)."""
