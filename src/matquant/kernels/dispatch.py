"""Backend dispatch for MatQuantLinear.forward.

Backends (``MatQuantLinear.backend``, set for a whole model with `matquant.set_backend`):

- ``torch``  the reference path (dequantize the current slice with `torch_ref`, cache it, dense matmul). Default.
- ``cpu``    the fast torch path of `kernels.cpu` (integer slicing + one multiply-add), with a per-layer cache of
             the dequantized weight of up to ``cache_precisions`` precisions (switching between cached ones is free).
             Runs on any device.
- ``triton`` fused dequantize-and-multiply (`kernels.triton_gemv`) for batch ≤ 16 tokens, fp16/bf16 activations,
             on CUDA (or CPU under TRITON_INTERPRET=1); larger batches (prefill) use dequantize + dense matmul
             (cuBLAS). ``layout='packed'`` keeps a nested-exact 2|2|4 copy of the codes so an r-bit nested slice
             reads only r bits per weight (for r ∈ {2, 4, 8}).
- ``auto``   ``triton`` on CUDA when triton is installed, else ``cpu``; calls the kernel does not take (e.g. fp32
             activations) go to the ``cpu`` path silently (it is the intended choice there, not a fallback).

A call a kernel cannot handle (dtype, device, group size, ...) falls back to the reference path with a one-time
warning naming the reason: the answer is never wrong, only slower.
"""
from __future__ import annotations

import warnings

import torch

from matquant.kernels import cpu, torch_ref
from matquant.kernels.packing import CHUNKS_DEFAULT, pack_codes

BACKENDS = ("torch", "cpu", "triton", "auto")
LAYOUTS = ("master", "packed")
_warned: set[tuple[str, str]] = set()


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


def warn_once(backend: str, reason: str) -> None:
    key = (backend, reason)
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"matquant {backend} backend cannot handle {reason}; falling back to the reference torch path "
                      "(correct but slower). This warning is shown once.", RuntimeWarning, stacklevel=3)


def reset_warnings() -> None:
    _warned.clear()


class BackendState:
    """Per-layer derived data of the fast backends (never saved; rebuilt after .to() / load_state_dict)."""

    def __init__(self, cache_precisions: int = 1, layout: str = "master"):
        self.weights = cpu.WeightCache(cache_precisions)
        self.params: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.layout = layout
        self.packed = None

    def slice_params(self, mod, bits: int, mode: str):
        key = (bits, mode, mod.scales.device)
        if key not in self.params:
            a, b = cpu.slice_params(mod.scales, mod.zeros, mod.master_bits, bits, mode)
            self.params[key] = (a.contiguous(), b.contiguous())
        return self.params[key]

    def codes(self, mod):
        if self.layout == "master" or mod.master_bits != 8:
            return mod.qweight
        if self.packed is None or self.packed.data.device != mod.qweight.device:
            self.packed = pack_codes(mod.qweight, CHUNKS_DEFAULT)
        return self.packed


def _state(mod) -> BackendState:
    if mod._backend_state is None:
        mod._backend_state = BackendState(mod.cache_precisions, mod.layout)
    return mod._backend_state


def _bias(mod, x):
    return None if mod.bias is None else mod.bias.to(x.dtype)


def _cpu_forward(mod, x):
    st = _state(mod)
    return cpu.linear(x, mod.qweight, mod.scales, mod.zeros, mod.master_bits, mod.bits, mod.slicing, mod.bias,
                      cache=st.weights if mod.cache_dequantized else None)


def _triton_forward(mod, x, quiet: bool = False):
    from matquant.kernels import triton_gemv as tg

    reason = tg.check_supported(x, mod.bits, mod.slicing, mod.group_size)
    if reason is not None:
        if quiet:  # 'auto': the fast torch path is the intended choice for what the kernel does not take
            return _cpu_forward(mod, x)
        warn_once("triton", reason)
        return None
    m = x.numel() // max(mod.in_features, 1)
    if m > tg.MAX_BATCH or m == 0:  # prefill: dequantize once (cached) + dense matmul
        return _cpu_forward(mod, x)
    st = _state(mod)
    a, b = st.slice_params(mod, mod.bits, mod.slicing)
    y = tg.matmul(x, st.codes(mod), a, b, mod.master_bits, mod.bits, mod.slicing, mod.group_size)
    bias = _bias(mod, x)
    return y if bias is None else y + bias


def forward(mod, x: torch.Tensor) -> torch.Tensor:
    """MatQuantLinear forward through its backend; reference path when the backend declines the call."""
    backend = mod.backend
    if backend == "auto":
        backend = "triton-auto" if (x.is_cuda and triton_available()) else "cpu"
    y = None
    if backend == "cpu":
        y = _cpu_forward(mod, x)
    elif backend == "triton":
        y = _triton_forward(mod, x)
    elif backend == "triton-auto":
        y = _triton_forward(mod, x, quiet=True)
    if y is None:  # "torch", or a fallback
        y = torch_ref.linear(x, mod.dequantized_weight(x.dtype), _bias(mod, x))
    return y

