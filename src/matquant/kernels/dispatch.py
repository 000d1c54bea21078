"""The backends by name, and 'auto'. `MatQuantLinear.set_backend` (`matquant.set_backend` for a whole model) builds
one backend object per layer with `make_backend`; the layer's forward runs through it.

- ``torch``  the reference path (`kernels.backend.Backend`): dequantize the current slice, cache it, dense matmul.
- ``cpu``    `kernels.cpu_backend`: the fast torch path with a cache of up to ``cache_precisions`` precisions.
- ``triton`` `kernels.triton_backend`: fused dequantize-and-multiply for small batches (CUDA).
- ``packed`` `kernels.packed_backend`: the memory-true CPU runtime (packed int4 codes, torch's int4 CPU kernel).
- ``auto``   ``packed`` for CPU tensors; on CUDA ``triton`` when triton is installed (calls the kernel does not take,
             e.g. fp32 activations, go to the ``cpu`` path silently), else ``cpu``.

A call a kernel cannot handle (dtype, device, group size, ...) falls back to the reference path (the packed runtime:
to the ``cpu`` path) with a one-time warning naming the reason: the answer is never wrong, only slower.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch

from matquant.kernels.backend import Backend, BackendOptions, reset_warnings
from matquant.kernels.cpu_backend import CpuBackend
from matquant.kernels.packed_backend import PackedBackend
from matquant.kernels.triton_backend import TritonBackend

BACKENDS = ("torch", "cpu", "triton", "packed", "auto")
__all__ = ["BACKENDS", "check_backend", "make_backend", "triton_available", "reset_warnings", "AutoBackend"]


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}.")
    if name == "triton" and not triton_available():
        raise ValueError("backend 'triton' needs the triton package: `pip install triton` (CUDA GPU required to run "
                         "it, or TRITON_INTERPRET=1 for a slow CPU check); use backend 'cpu' or 'torch' otherwise.")
    return name


class AutoBackend(Backend):
    """Picks the path per call from the activations' device; the three share one 'cpu' path (and its cache)."""

    name = "auto"

    def __init__(self, options: BackendOptions | None = None):
        super().__init__(options)
        self.cpu = CpuBackend(self.options)
        self.packed = PackedBackend(self.options, dense=self.cpu)
        self.triton = TritonBackend(self.options, dense=self.cpu, quiet=True)

    def path(self, device: torch.device) -> Backend:
        if device.type == "cuda" and triton_available():
            return self.triton
        return self.packed if device.type == "cpu" else self.cpu

    def prepare(self, layer, bits: int, mode: str) -> None:
        self.path(layer.scales.device).prepare(layer, bits, mode)

    def packed_slice(self, layer, bits: int | None = None, mode: str | None = None):
        return self.packed.packed_slice(layer, bits, mode)

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        return self.path(x.device).forward(layer, x)

    def resident_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.packed.resident_tensors()  # with the shared cpu path's
        yield from ((n, t) for n, t in self.triton.resident_tensors() if not n.startswith("weights."))

    def resident_precisions(self) -> list[tuple[int, str]]:
        return self.packed.resident_precisions()

    def clear(self) -> None:
        self.packed.clear()
        self.triton.clear()

    def drop_dense_weights(self) -> None:
        self.cpu.drop_dense_weights()


_CLASSES = {"torch": Backend, "cpu": CpuBackend, "triton": TritonBackend, "packed": PackedBackend, "auto": AutoBackend}


def make_backend(name: str, options: BackendOptions | None = None) -> Backend:
    """A fresh backend object `name` (checked: a clear ValueError for an unknown or unusable one)."""
    return _CLASSES[check_backend(name)](options)
