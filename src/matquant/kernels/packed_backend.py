"""The 'packed' backend, the memory-true CPU runtime: each layer holds its slice as packed 4-bit codes (two 4-bit
planes, or a bf16 weight, for r > 4; `kernels.cpu_packed`) and runs torch's int4 CPU kernel; int2 and int3 slices
are held at 2 and 3 bits per weight and run by the low-bit kernel (`kernels.lowbit`) when it is built (otherwise,
after one warning, as 4-bit codes like int4); no dense weight.

Precisions listed in ``keep`` stay packed side by side (switching among them is free); others are re-packed from
the master codes on the next forward or, when the layer holds its master as packed planes
(`kernels.master_planes`) and the slicing is nested, cut from them with at most one AND. A layer the kernel cannot
take runs on the 'cpu' path with one warning."""
from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from matquant.kernels import cpu_packed, lowbit, master_planes
from matquant.kernels.backend import Backend, BackendOptions, warn_once
from matquant.kernels.cpu_backend import CpuBackend


def layer_reason(layer, bits: int | None = None, mode: str | None = None, high_format: str = "int4x2") -> str | None:
    """Why the packed runtime cannot hold `layer` at (bits, mode) (default: its current ones); None if it can."""
    return cpu_packed.layer_reason(layer.out_features, layer.in_features, layer.group_size,
                                   layer.bits if bits is None else bits, layer.master_bits,
                                   layer.slicing if mode is None else mode, high_format)


def planes_eligible(layer) -> bool:
    """Whether the layer's master codes can be held as packed planes (`MatQuantLinear.hold_master_packed`):
    nested slicing, a build whose packing passes `master_planes.planes_supported`, a shape the int4 kernel takes."""
    return (layer.slicing == "nested" and not layer.master_dropped and layer.scales.device.type == "cpu"
            and master_planes.planes_supported()
            and layer_reason(layer, layer.master_bits, "paper") is None)


def uses_lowbit(layer, bits: int, mode: str) -> bool:
    """Whether the packed runtime holds `layer` at (bits, mode) in the low-bit format (`kernels.lowbit`): int2/int3,
    a shape it takes where it is smaller than int4, and the kernel built (False after its one warning if it cannot
    be)."""
    n, k, g = layer.out_features, layer.in_features, layer.group_size
    return (bits in lowbit.BITS and lowbit.layer_reason(n, k, g, bits, mode, layer.master_bits) is None
            and lowbit.smaller_than_int4(n, k, g, bits) and lowbit.available())


def slice_bytes(layer, bits: int, mode: str | None = None) -> int | None:
    """Bytes of the low-bit slice the packed runtime would hold at `bits` (None: not the low-bit format)."""
    mode = layer.slicing if mode is None else mode
    if not uses_lowbit(layer, bits, mode):
        return None
    return lowbit.slice_bytes(layer.out_features, layer.in_features, layer.group_size, bits)


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


class PackedBackend(Backend):
    """`dense`: the 'cpu' backend a declined layer runs on (shared with 'auto')."""

    name = "packed"

    def __init__(self, options: BackendOptions | None = None, dense: CpuBackend | None = None):
        super().__init__(options)
        self.dense = dense or CpuBackend(self.options)
        self.slices: dict[tuple[int, str], cpu_packed.PackedSlice] = {}  # per (bits, mode)

    def reason(self, layer, bits: int | None = None, mode: str | None = None) -> str | None:
        return layer_reason(layer, bits, mode, self.options.high_format)

    def packed_slice(self, layer, bits: int | None = None, mode: str | None = None
                     ) -> cpu_packed.PackedSlice | lowbit.LowbitSlice:
        """The layer's PackedSlice (or LowbitSlice, int2/int3) at (bits, mode), built from the master codes if not resident. Precisions not in
        ``keep`` (other than the one asked for) are dropped, so at most len(keep) + 1 stay resident."""
        bits = layer.bits if bits is None else bits
        mode = layer.slicing if mode is None else mode
        if bits >= layer.master_bits:
            mode = "paper"  # the full-precision slice is the same in every mode
        key = (bits, mode)
        ps = self.slices.get(key)
        planes = layer.master_planes
        if ps is None and not layer.master_dropped and uses_lowbit(layer, bits, mode):
            ps = self._lowbit_slice(layer, bits, mode)
            if ps.mode == "nested":  # nested int2 and int3 share the 2-bit plane (kernels/lowbit.py)
                other = next((p for p in self.slices.values() if isinstance(p, lowbit.LowbitSlice)
                              and p.mode == "nested" and p.codes.shape == ps.codes.shape), None)
                if other is not None:
                    ps.codes = other.codes
            self.slices[key] = ps
        if (ps is None and planes is not None and (mode == "nested" or bits >= layer.master_bits)
                and not (bits > 4 and self.options.high_format == "bf16")):  # a switch: at most one AND
            sz = layer.group_params(bits, mode)  # a slice with its own (α, z) shares no scale tables
            like = next((p for p in self.slices.values() if master_planes.planes_layout(p, layer.master_bits)
                         and layer.group_params(p.bits, p.mode)[0] is sz[0]), None)
            with single_thread():
                ps = self.slices[key] = master_planes.nested_slice(planes, *sz, bits, layer.group_size, like=like)
        if ps is None:
            if layer.master_dropped:
                raise ValueError(f"int{bits} ({mode}) is not resident and the master codes were dropped "
                                 f"(keep_master=False); resident: {sorted(self.slices)}. Reload the checkpoint with "
                                 "keep_master=True, or list this precision in keep=[...].")
            # paper slices (no bit prefix) and the bf16 format: re-packed from the uint8 codes
            ps = cpu_packed.pack_slice(layer.master_codes(), *layer.group_params(bits, mode), layer.master_bits,
                                       bits, mode, layer.group_size, self.options.high_format)
            self.slices[key] = ps
        if len(self.slices) > 1 and not layer.master_dropped:  # a switch: free the precisions not kept
            for k in [k for k in self.slices if k != key and k[0] not in self.options.keep]:
                del self.slices[k]
        return ps

    @staticmethod
    def _lowbit_slice(layer, bits: int, mode: str) -> lowbit.LowbitSlice:
        """int2/int3 in the low-bit format: cut from the master's hi plane (nested; one C++ pass) or packed from
        the uint8 codes."""
        planes = layer.master_planes
        sz = layer.group_params(bits, mode)
        if planes is not None and (mode == "nested" or bits >= layer.master_bits) and lowbit.planes_convertible():
            with single_thread():
                return lowbit.from_planes(planes.hi, layer.out_features, layer.in_features, *sz, layer.master_bits,
                                          bits, layer.group_size)
        return lowbit.pack_slice(layer.master_codes(), *sz, layer.master_bits, bits, mode, layer.group_size)

    def prepare(self, layer, bits: int, mode: str) -> None:
        self.packed_slice(layer, bits, mode)

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        reason = self.reason(layer) or cpu_packed.input_reason(x)
        if reason is None:
            ps = self.packed_slice(layer)
            if isinstance(ps, lowbit.LowbitSlice):
                return lowbit.linear(x, ps, layer.bias)
            return cpu_packed.linear(x, ps, layer.bias)
        if layer.master_dropped:
            raise ValueError(f"this layer cannot run its packed slice on {reason} and its master codes were dropped "
                             "(keep_master=False); reload with keep_master=True to use other backends.")
        warn_once(("packed", reason), f"matquant packed backend cannot handle {reason}; such layers run on the "
                  "'cpu' path instead (correct, but it holds a dense weight of the slice). This warning is shown once.")
        layer.restore_master()  # the cpu path reads the uint8 codes
        return self.dense.forward(layer, x)

    def resident_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.dense.resident_tensors()
        for (bits, mode), ps in self.slices.items():
            for i, t in enumerate(ps.tensors()):
                yield f"slices.{bits}.{mode}.{i}", t

    def resident_precisions(self) -> list[tuple[int, str]]:
        return sorted(self.slices)

    def clear(self) -> None:
        self.dense.clear()
        self.slices.clear()

    def drop_dense_weights(self) -> None:
        self.dense.drop_dense_weights()
