"""What a model really holds in memory, and the packed runtime's preparation steps (pack now, drop the master).

`resident_tensors` walks every tensor a module keeps alive: parameters, buffers, and what each MatQuantLinear
derived (`MatQuantLinear.derived_tensors`: the reference path's cached weight, the master codes when held as packed
planes, and whatever its backend object lists in `resident_tensors()`).
Tensors on the meta device (dropped master codes) hold no memory and are skipped; shared storage is counted once.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from torch import nn

from matquant.kernels.packed_backend import layer_reason, planes_eligible
from matquant.nn.bits import matquant_modules
from matquant.nn.linear import MatQuantLinear


def resident_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor the model keeps alive (meta tensors skipped; duplicates possible)."""
    for name, t in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        if t is not None and t.device.type != "meta":
            yield name, t
    for mname, m in model.named_modules():
        if isinstance(m, MatQuantLinear):
            for name, t in m.derived_tensors():
                yield f"{mname}.{name}" if mname else name, t


def _unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for t in tensors:
        st = t.untyped_storage()
        key = (st.data_ptr(), st.nbytes())
        if key in seen:
            continue
        seen.add(key)
        total += st.nbytes()
    return total


def resident_bytes(model: nn.Module) -> int:
    """Bytes of all tensors the model keeps alive (shared storage once)."""
    return _unique_bytes(t for _, t in resident_tensors(model))


def quantized_resident_bytes(model: nn.Module) -> int:
    """Bytes held by the quantized layers only (codes, scales, zeros, biases, packed slices, caches)."""
    return _unique_bytes(t for m in matquant_modules(model).values() for _, t in resident_tensors(m))


def prepare_packed(model: nn.Module, keep: Sequence[int] = (), planes: bool = True) -> dict[str, str]:
    """Pack every packed/auto-backend layer's current precision and the `keep` precisions now (instead of at the
    first forward). With `planes` (default), a nested-sliced layer's master codes are held as two packed planes
    instead of uint8 (`MatQuantLinear.hold_master_packed`: same 8 bits/weight; every nested `set_bits` is then
    at most one AND per layer). Returns {module: reason} for layers (or kept precisions) the packed runtime
    declines."""
    declined = {}
    for name, m in matquant_modules(model).items():
        if m.backend not in ("packed", "auto") or m.scales.device.type != "cpu":
            continue
        wanted = [m.bits] + [b for b in keep if b != m.bits and b <= m.master_bits]
        for b in wanted:
            reason = layer_reason(m, b, high_format=m.compute_backend.options.high_format)
            if reason is not None:
                declined[name] = reason
                break
        else:
            if planes and planes_eligible(m):
                m.hold_master_packed()
            for b in reversed(wanted):  # the current precision last, so it is never evicted
                m.compute_backend.prepare(m, b, m.slicing)
    return declined


def drop_master(model: nn.Module, keep: Sequence[int] = ()) -> tuple[int, dict[str, str]]:
    """`prepare_packed(keep)`, then free the master codes of every layer whose wanted precisions are all packed.
    Declined layers keep their master codes (they need them to run). Returns (bytes freed, {declined: reason})."""
    declined = prepare_packed(model, keep, planes=False)
    freed = 0
    for name, m in matquant_modules(model).items():
        if name not in declined and m.compute_backend.resident_precisions():
            freed += m.drop_master()
    return freed, declined
