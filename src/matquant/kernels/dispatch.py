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
- ``packed`` the memory-true CPU runtime (`kernels.cpu_packed`): each layer holds its slice as packed 4-bit codes
             (two 4-bit planes for r > 4) and runs torch's int4 CPU kernel; no dense weight is built. Precisions
             listed in ``keep`` stay packed side by side (switching among them is free); others are re-packed from
             the master codes on the next forward, or, when the master is held as packed planes
             (`MatQuantLinear.hold_master_packed`, what `matquant.load` does) and the slicing is nested, cut from
             them with at most one AND (~nothing). A layer the kernel cannot take runs on the ``cpu`` path with one
             warning.
- ``auto``   ``packed`` for CPU tensors; on CUDA ``triton`` when triton is installed (calls the kernel does not take,
             e.g. fp32 activations, go to the ``cpu`` path silently), else ``cpu``.

A call a kernel cannot handle (dtype, device, group size, ...) falls back to the reference path with a one-time
warning naming the reason: the answer is never wrong, only slower.
"""
from __future__ import annotations

import contextlib
import warnings

import torch

from matquant.kernels import cpu, cpu_packed, torch_ref
from matquant.kernels.packing import CHUNKS_DEFAULT, pack_codes

BACKENDS = ("torch", "cpu", "triton", "packed", "auto")
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
        self.slices: dict[tuple[int, str], cpu_packed.PackedSlice] = {}  # packed backend, per (bits, mode)

    def slice_params(self, mod, bits: int, mode: str):
        key = (bits, mode, mod.scales.device)
        if key not in self.params:
            a, b = cpu.slice_params(*mod.group_params(bits, mode), mod.master_bits, bits, mode)
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
    return cpu.linear(x, mod.qweight, *mod.group_params(), mod.master_bits, mod.bits, mod.slicing, mod.bias,
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


def packed_reason(mod, bits: int | None = None, mode: str | None = None) -> str | None:
    """Why the packed runtime cannot hold this layer at (bits, mode) (default: its current ones); None if it can."""
    return cpu_packed.layer_reason(mod.out_features, mod.in_features, mod.group_size,
                                   mod.bits if bits is None else bits, mod.master_bits,
                                   mod.slicing if mode is None else mode, mod.high_format)


def planes_eligible(mod) -> bool:
    """Whether the layer's master codes can be held as packed planes (`MatQuantLinear.hold_master_packed`):
    nested slicing, a build whose packing passes `cpu_packed.planes_supported`, a shape the int4 kernel takes."""
    return (mod.slicing == "nested" and not mod.master_dropped and mod.scales.device.type == "cpu"
            and cpu_packed.planes_supported()
            and cpu_packed.layer_reason(mod.out_features, mod.in_features, mod.group_size, mod.master_bits,
                                        mod.master_bits, "paper", "int4x2") is None)


@contextlib.contextmanager
def single_thread():
    """Run a block on one torch thread: a switch is ~10 small ops per layer (an AND over one plane, a table column),
    which a second thread does not speed up and, on a busy machine, slows down badly (docs/benchmarks.md, "Precision
    switch at 2 threads")."""
    n = torch.get_num_threads()
    if n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def packed_slice(mod, bits: int | None = None, mode: str | None = None) -> cpu_packed.PackedSlice:
    """The layer's PackedSlice at (bits, mode), built from the master codes if not resident. Precisions not in
    ``mod.keep_bits`` (other than the one asked for) are dropped, so at most len(keep) + 1 stay resident."""
    bits = mod.bits if bits is None else bits
    mode = mod.slicing if mode is None else mode
    if bits >= mod.master_bits:
        mode = "paper"  # the full-precision slice is the same in every mode
    st = _state(mod)
    key = (bits, mode)
    ps = st.slices.get(key)
    if (ps is None and mod.master_planes is not None and (mode == "nested" or bits >= mod.master_bits)
            and not (bits > 4 and mod.high_format == "bf16")):  # a switch: at most one AND over one plane
        sz = mod.group_params(bits, mode)  # a slice with its own (α, z) shares no scale tables with the others
        like = next((p for p in st.slices.values() if cpu_packed.planes_layout(p, mod.master_bits)
                     and mod.group_params(p.bits, p.mode)[0] is sz[0]), None)
        with single_thread():
            ps = st.slices[key] = cpu_packed.nested_slice(mod.master_planes, *sz, bits,
                                                          mod.group_size, like=like)
    if ps is None:
        if mod.master_dropped:
            raise ValueError(f"int{bits} ({mode}) is not resident and the master codes were dropped "
                             f"(keep_master=False); resident: {sorted(st.slices)}. Reload the checkpoint with "
                             "keep_master=True, or list this precision in keep=[...].")
        # paper slices (no bit prefix) and the bf16 format: re-packed from the uint8 codes
        ps = cpu_packed.pack_slice(mod.master_codes(), *mod.group_params(bits, mode), mod.master_bits, bits, mode,
                                   mod.group_size, mod.high_format)
        st.slices[key] = ps
    if len(st.slices) > 1 and not mod.master_dropped:  # a switch: free the precision(s) left that are not kept
        for k in [k for k in st.slices if k != key and k[0] not in mod.keep_bits]:
            del st.slices[k]
    return ps


def _packed_forward(mod, x):
    reason = packed_reason(mod) or cpu_packed.input_reason(x)
    if reason is not None:
        if mod.master_dropped:
            raise ValueError(f"this layer cannot run its packed slice on {reason} and its master codes were dropped "
                             "(keep_master=False); reload with keep_master=True to use other backends.")
        key = ("packed", reason)
        if key not in _warned:
            _warned.add(key)
            warnings.warn(f"matquant packed backend cannot handle {reason}; such layers run on the 'cpu' path "
                          "instead (correct, but it holds a dense weight of the slice). This warning is shown once.",
                          RuntimeWarning, stacklevel=4)
        mod.restore_master()  # the cpu path reads the uint8 codes
        return _cpu_forward(mod, x)
    return cpu_packed.linear(x, packed_slice(mod), mod.bias)


def forward(mod, x: torch.Tensor) -> torch.Tensor:
    """MatQuantLinear forward through its backend; reference path when the backend declines the call."""
    backend = mod.backend
    if backend == "auto":
        backend = "triton-auto" if (x.is_cuda and triton_available()) else ("packed" if x.device.type == "cpu"
                                                                            else "cpu")
    y = None
    if backend == "packed":
        y = _packed_forward(mod, x)
    elif backend == "cpu":
        y = _cpu_forward(mod, x)
    elif backend == "triton":
        y = _triton_forward(mod, x)
    elif backend == "triton-auto":
        y = _triton_forward(mod, x, quiet=True)
    if y is None:  # "torch", or a fallback
        y = torch_ref.linear(x, mod.dequantized_weight(x.dtype), _bias(mod, x))
    return y

