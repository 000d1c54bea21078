"""The one packed layout of the master codes: two 4-bit planes in the int4 CPU kernel's own packing.

Fast switching (``nested`` only): the master held as two packed planes (`MasterPlanes`). With the c-bit master
code left-aligned to 8 bits, Q = q << (8 − c), the nested r-bit code is q_r = Q >> (8 − r): the top r bits of Q.
Planes hi = pack(Q >> 4) and lo = pack(Q & 15) cost the 8 bits per weight of the uint8 master codes, and every
nested slice is cut from them with at most one bitwise AND over one plane (torch's CPU packing only permutes raw
nibbles, so pack(v) & m = pack(v & m) for a nibble mask m repeated in both halves of a byte; `planes_supported`
checks this once on this build):

- r ≤ 4   one plane hi & m_r (m_r = the top r bits of a nibble) holding v = q_r·2^(4−r): scale = A·2^(r−4),
          zero = B + 8·scale (the weight at v = 8, inside the group's range; r = 4: hi itself, no copy).
- r = 5–8 hi (shared, no copy) with scale A·2^(r−4) and lo & m_(r−4) (r = 8: lo itself) with scale A·2^(r−8);
          the lo plane's zero absorbs the bf16 rounding of the hi zero.

For r = 4 and r = 8 these are byte for byte the paper layouts of `kernels.cpu_packed`. ``paper`` slices round (a
carry can reach the top bits) and are no bit prefix: they are re-packed from the codes (unpacked from the planes
if the master is held that way; docs/runtime.md has the cost). Why this is the only packed master layout (the
chunked 2|2|4 planes were removed): docs/kernels.md, "One packed master layout".
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from matquant.kernels.cpu_packed import (
    PackedSlice, available, kernel_group, left_aligned, nested_tables, nibble_mask, pack4,
)


@dataclass
class MasterPlanes:
    """The c-bit master codes of one layer held as packed planes: hi = pack(Q >> 4), lo = pack(Q & 15) with
    Q = q << (8 − c) (lo is None for c ≤ 4). 8 bits per weight, like the uint8 codes they replace."""

    master_bits: int
    out_features: int
    in_features: int
    hi: torch.Tensor
    lo: torch.Tensor | None

    def tensors(self) -> list[torch.Tensor]:
        return [self.hi] if self.lo is None else [self.hi, self.lo]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def pack_master(codes: torch.Tensor, master_bits: int) -> MasterPlanes:
    """MasterPlanes of uint8 master codes [out, in] (the layer must pass `layer_reason`)."""
    top = left_aligned(codes, master_bits)
    n, k = codes.shape
    return MasterPlanes(master_bits, n, k, pack4(top >> 4), pack4(top & 15) if master_bits > 4 else None)


@functools.lru_cache(maxsize=8)
def _nibble_sources(n: int, k: int) -> torch.Tensor:
    """For each nibble of a packed [n, k] plane (byte i: low nibble 2i, high nibble 2i + 1), the flat index
    row·k + col of the code it holds: found by packing the index's hex digits (no knowledge of the layout needed)."""
    idx = torch.arange(n * k, dtype=torch.int32).view(n, k)
    src = torch.zeros(n * k, dtype=torch.int64)
    for d in range(0, max(1, (n * k - 1).bit_length()), 4):
        p = pack4((idx >> d) & 15)
        src |= torch.stack([p & 15, p >> 4], dim=-1).flatten().to(torch.int64) << d
    return src


def unpack4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    nib = torch.stack([packed & 15, packed >> 4], dim=-1).flatten()
    out = torch.empty(n * k, dtype=torch.uint8)
    out[_nibble_sources(n, k)] = nib
    return out.view(n, k)


def unpack_master(planes: MasterPlanes) -> torch.Tensor:
    """The uint8 master codes [out, in] back from MasterPlanes (exact; for saving, other backends, paper slices)."""
    n, k, c = planes.out_features, planes.in_features, planes.master_bits
    top = unpack4(planes.hi, n, k) << 4
    if planes.lo is not None:
        top |= unpack4(planes.lo, n, k)
    _nibble_sources.cache_clear()  # index tables are 8 bytes per weight: not kept
    return top >> (8 - c)


def shares_planes(bits: int, master_bits: int) -> bool:
    """Whether `nested_slice` at `bits` holds no copy: only the planes themselves (r = 4 or r = master bits)."""
    return bits in (4, master_bits)


def planes_layout(ps: PackedSlice, master_bits: int) -> bool:
    """Whether a PackedSlice is in the planes layout (nested, or the full precision): its tables can serve as
    `nested_slice(like=...)`."""
    return bool(ps.parts) and (ps.mode == "nested" or ps.bits >= master_bits)


def nested_slice(planes: MasterPlanes, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                 group_size: int, like: PackedSlice | None = None) -> PackedSlice:
    """The nested r-bit slice cut from MasterPlanes: at most one AND over one plane (see module doc). Equals
    `pack_slice(codes, ..., bits, 'nested')` byte for byte; r = 4 and r = master bits share the planes' storage.
    `like`: another planes-layout slice of this layer, whose r-independent scale columns are reused."""
    c, n, k = planes.master_bits, planes.out_features, planes.in_features
    if not 1 <= bits <= c:
        raise ValueError(f"cannot cut int{bits} out of {c}-bit master codes: need 1 <= bits <= {c}.")
    g = kernel_group(group_size)
    like_tables = [t for _, t in like.parts] if like is not None and planes_layout(like, c) else None
    if bits <= 4:  # r = 4 or r = c: the plane itself (its lower bits are the mask's zeros already)
        m = 15 if bits == c else nibble_mask(bits)
        parts = [planes.hi if m == 15 else planes.hi & (m << 4 | m)]
    else:
        m = 15 if bits == c else nibble_mask(bits - 4)
        parts = [planes.hi, planes.lo if m == 15 else planes.lo & (m << 4 | m)]
    return PackedSlice(bits, "nested" if bits < c else "paper", n, k, g,
                       parts=list(zip(parts, nested_tables(scales, zeros, c, bits, group_size, g, like_tables))))


@functools.lru_cache(maxsize=1)
def planes_supported() -> bool:
    """Whether this build's packing stores raw nibbles so that pack(v) & m == pack(v & m) and unpacking by
    `_nibble_sources` inverts it (checked once on small shapes, full and partial blocks)."""
    if not available():
        return False
    gen = torch.Generator().manual_seed(0)
    try:
        for n, k in ((48, 64), (80, 32), (128, 96)):
            q = torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen)
            p = pack4(q)
            if not torch.equal(unpack4(p, n, k), q.to(torch.uint8)):
                return False
            for r in range(1, 4):
                m = nibble_mask(r)
                if not torch.equal(p & (m << 4 | m), pack4(q & m)):
                    return False
    except RuntimeError:
        return False
    finally:
        _nibble_sources.cache_clear()
    return True
