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


def embedding_resident_bytes(model: nn.Module) -> int:
    """Bytes held by the token embedding and the output head (fp32 weights or int8 tables; a tied pair once)."""
    from matquant.nn.quantized_embedding import embedding_modules

    return _unique_bytes(t for m in embedding_modules(model).values() for _, t in resident_tensors(m))


def resident_bytes_by_part(model: nn.Module) -> dict[str, int]:
    """{'quantized layers', 'embeddings and head', 'other', 'total'}: `resident_bytes` split by part (norms, rotary
    tables and any unquantized linear layer are 'other')."""
    total = resident_bytes(model)
    quantized = quantized_resident_bytes(model)
    embeddings = embedding_resident_bytes(model)
    return {"quantized layers": quantized, "embeddings and head": embeddings,
            "other": total - quantized - embeddings, "total": total}


def describe_resident(parts: dict[str, int]) -> str:
    """One line for a report: 'resident 92.1 MiB (quantized layers 60.0, embeddings and head 27.0, other 5.1)'."""
    inner = ", ".join(f"{k} {v / 2**20:.1f}" for k, v in parts.items() if k != "total")
    return f"resident {parts['total'] / 2**20:.1f} MiB ({inner})"


def prepare_layer(m: MatQuantLinear, keep: Sequence[int] = (), planes: bool = True) -> str | None:
    """`prepare_packed` for one layer: pack its current precision and the `keep` precisions now (nothing for a
    layer not on the packed/auto backend on CPU). Returns the reason the packed runtime declines it, else None."""
    if m.backend not in ("packed", "auto") or m.scales.device.type != "cpu":
        return None
    wanted = [m.bits] + [b for b in keep if b != m.bits and b <= m.master_bits]
    for b in wanted:
        reason = layer_reason(m, b, high_format=m.compute_backend.options.high_format)
        if reason is not None:
            return reason
    if planes and planes_eligible(m):
        m.hold_master_packed()
    for b in reversed(wanted):  # the current precision last, so it is never evicted
        m.compute_backend.prepare(m, b, m.slicing)
    return None


def prepare_packed(model: nn.Module, keep: Sequence[int] = (), planes: bool = True) -> dict[str, str]:
    """Pack every packed/auto-backend layer's current precision and the `keep` precisions now (instead of at the
    first forward). With `planes` (default), a nested-sliced layer's master codes are held as two packed planes
    instead of uint8 (`MatQuantLinear.hold_master_packed`: same 8 bits/weight; every nested `set_bits` is then
    at most one AND per layer). Returns {module: reason} for layers (or kept precisions) the packed runtime
    declines."""
    declined = {}
    for name, m in matquant_modules(model).items():
        reason = prepare_layer(m, keep, planes)
        if reason is not None:
            declined[name] = reason
    return declined


def drop_layer_master(m: MatQuantLinear, keep: Sequence[int] = ()) -> tuple[int, str | None]:
    """`prepare_layer(keep)` without planes, then free the layer's master codes if its wanted precisions are all
    packed (a declined layer keeps them: it needs them to run). Returns (bytes freed, the reason it was declined).
    The streaming load (`matquant.load(keep_master=False)`) calls this as each layer is read."""
    reason = prepare_layer(m, keep, planes=False)
    if reason is None and m.compute_backend.resident_precisions():
        return m.drop_master(), None
    return 0, reason


def release_freed_memory() -> None:
    """Hand the C heap's freed pages back to the OS (glibc `malloc_trim`; nothing elsewhere). The streaming load frees
    one layer's master codes at a time; without this, freed blocks below glibc's mmap threshold stay in the
    process as fragmentation and its RSS creeps up layer by layer."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def drop_master(model: nn.Module, keep: Sequence[int] = ()) -> tuple[int, dict[str, str]]:
    """`prepare_packed(keep)`, then free the master codes of every layer whose wanted precisions are all packed.
    Declined layers keep their master codes (they need them to run). Returns (bytes freed, {declined: reason})."""
    freed, declined = 0, {}
    for name, m in matquant_modules(model).items():
        n, reason = drop_layer_master(m, keep)
        freed += n
        if reason is not None:
            declined[name] = reason
    return freed, declined
