"""Nested-exact packed layout of uint8 master codes: the codes split into most-significant-first bit chunks.

An 8-bit master code q = b7 b6 ... b0 is cut into contiguous bit chunks, most significant first. The default
layout is **2|2|4**: chunk A = bits 7-6, chunk B = bits 5-4, chunk C = bits 3-0. Every chunk is stored as its own
*plane*: a [out, k_pad·w/8] uint8 array packing 8/w chunk values per byte along the input dimension
(value j of a byte sits at bits j·w .. j·w+w−1, least significant first). Planes are stored plane-major in
one flat buffer, so reading the first p planes touches one contiguous prefix of the buffer.

Bits read per weight by an r-bit slice (the sum of the widths of the planes needed):

=========  ============  =============================================================
layout     nested r       paper r (needs one more bit: the rounding carry, see below)
=========  ============  =============================================================
2|2|4      2→2 3→4 4→4    2→4 3→4 4→8 6→8 8→8
           6→8 8→8
2|1|1|2|2  exact for      r+1 for r∈{2,3}; 4→6 (carry bit 3 sits in the 2-bit chunk 3-2),
           2,3,4,6,8      6→8, 8→8
bit-planes exact for all  r+1 (r<8)
=========  ============  =============================================================

Why 2|2|4 is the default: the paper's served precisions are int8/int4/int2 and 2|2|4 reads *exactly* r bits for
each of them with only 3 planes (cheap to unpack: three loads, shifts and masks per weight at r=8), while
bit-planes need up to 8 loads per weight at r=8. int3 reads 4 bits (25 % over) and int6 reads 8 (33 % over) in
2|2|4; `CHUNKS_EXACT` = 2|1|1|2|2 makes all of {2,3,4,6,8} exact at the cost of 5 planes. Any composition of 8
is accepted (``chunks=(1,)*8`` is the bit-plane layout).

``paper`` slicing needs a rounding carry: S(q, r) = clamp(floor(q/2^s + 1/2), 0, 2^r−1) with s = 8−r equals
clamp(q_top + b_{s−1}, 0, 2^r−1), where q_top = q >> s is the nested slice and b_{s−1} is the first bit *below*
the slice. So a paper slice reads r+1 bits rounded up to a plane boundary (the table above): on 2|2|4 that is
4 bits at int2 (2× the nested traffic) and the full 8 bits at int4. ``nested`` slicing is a pure prefix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from matquant.quant.slicing import DEFAULT_SLICING

CHUNKS_DEFAULT = (2, 2, 4)
CHUNKS_EXACT = (2, 1, 1, 2, 2)
BITPLANES = (1,) * 8
ALLOWED_WIDTHS = (1, 2, 4, 8)


def check_chunks(chunks: tuple[int, ...], master_bits: int = 8) -> tuple[int, ...]:
    chunks = tuple(int(c) for c in chunks)
    if not chunks or any(c not in ALLOWED_WIDTHS for c in chunks) or sum(chunks) != master_bits:
        raise ValueError(
            f"invalid chunk layout {chunks}: chunk widths must be in {ALLOWED_WIDTHS} (so a byte holds a whole "
            f"number of chunk values) and sum to the master bits ({master_bits}), e.g. {CHUNKS_DEFAULT}."
        )
    return chunks


def planes_needed(chunks: tuple[int, ...], bits: int, mode: str = DEFAULT_SLICING, master_bits: int = 8) -> int:
    """Number of leading planes an r-bit slice must read (nested: r bits; paper/extra: r+1 bits for the carry)."""
    need = bits if (mode == "nested" or bits >= master_bits) else bits + 1
    covered = 0
    for p, w in enumerate(chunks):
        covered += w
        if covered >= need:
            return p + 1
    return len(chunks)


def bits_read(chunks: tuple[int, ...], bits: int, mode: str = DEFAULT_SLICING, master_bits: int = 8) -> int:
    """Code bits read per weight by an r-bit slice in this layout."""
    return sum(chunks[: planes_needed(chunks, bits, mode, master_bits)])


@dataclass
class PackedCodes:
    """Master codes [out, in] in the chunked plane layout. `data` is flat uint8 of size out·k_pad·master_bits/8."""

    data: torch.Tensor
    chunks: tuple[int, ...]
    out_features: int
    in_features: int
    k_pad: int  # in_features rounded up to a multiple of 8 (pad values are 0)

    @property
    def master_bits(self) -> int:
        return sum(self.chunks)

    def plane_offset(self, p: int) -> int:
        return self.out_features * self.k_pad * sum(self.chunks[:p]) // 8

    def plane(self, p: int) -> torch.Tensor:
        """Plane p as a [out, k_pad·w/8] uint8 view."""
        w = self.chunks[p]
        n = self.out_features * self.k_pad * w // 8
        off = self.plane_offset(p)
        return self.data[off: off + n].view(self.out_features, self.k_pad * w // 8)

    def nbytes_read(self, bits: int, mode: str = DEFAULT_SLICING) -> int:
        """Bytes of code data an r-bit slice reads (the contiguous prefix of `data`)."""
        return self.plane_offset(planes_needed(self.chunks, bits, mode, self.master_bits))

    def to(self, device) -> "PackedCodes":
        return PackedCodes(self.data.to(device), self.chunks, self.out_features, self.in_features, self.k_pad)


def pack_codes(codes: torch.Tensor, chunks: tuple[int, ...] = CHUNKS_DEFAULT, master_bits: int = 8) -> PackedCodes:
    """Pack uint8 master codes [out, in] (values < 2^master_bits) into the chunked plane layout."""
    chunks = check_chunks(chunks, master_bits)
    if codes.dim() != 2 or codes.dtype != torch.uint8:
        raise ValueError(f"pack_codes expects uint8 codes of shape [out, in], got {codes.dtype} {tuple(codes.shape)}.")
    if master_bits < 8 and bool((codes >> master_bits).any()):
        raise ValueError(f"codes exceed {master_bits} bits; pass the master bits the codes were quantized with.")
    n, k = codes.shape
    k_pad = -(-k // 8) * 8
    q = codes.to(torch.int32)
    if k_pad != k:
        q = torch.nn.functional.pad(q, (0, k_pad - k))
    parts = []
    shift = master_bits
    for w in chunks:
        shift -= w
        vals = (q >> shift) & ((1 << w) - 1)  # [n, k_pad]
        per = 8 // w
        vals = vals.view(n, k_pad // per, per)
        weights = (torch.arange(per, device=codes.device, dtype=torch.int32) * w)
        packed = (vals << weights).sum(-1)  # disjoint bit fields: sum == bitwise or
        parts.append(packed.to(torch.uint8).reshape(-1))
    return PackedCodes(torch.cat(parts), chunks, n, k, k_pad)


def unpack_planes(packed: PackedCodes, n_planes: int | None = None, rows: slice | None = None) -> torch.Tensor:
    """The top bits covered by the first `n_planes` planes, as uint8 [out, in] (all planes: the master codes).
    `rows` restricts to a range of output rows."""
    n_planes = len(packed.chunks) if n_planes is None else n_planes
    if not 1 <= n_planes <= len(packed.chunks):
        raise ValueError(f"n_planes must be in 1..{len(packed.chunks)}, got {n_planes}.")
    rows = rows or slice(0, packed.out_features)
    k_pad = packed.k_pad
    t = None
    for p in range(n_planes):
        w = packed.chunks[p]
        per = 8 // w
        b = packed.plane(p)[rows]  # uint8 [n, k_pad/per]
        n = b.shape[0]
        mask = (1 << w) - 1
        # scalar shifts (vectorised) rather than a broadcast shift tensor (several times slower on CPU)
        vals = b if per == 1 else torch.stack([(b >> (j * w)) & mask for j in range(per)], dim=-1).reshape(n, k_pad)
        t = vals if t is None else (t << w) | vals  # covered bits <= 8: uint8 never overflows
    return t[:, : packed.in_features]


def unpack_codes(packed: PackedCodes) -> torch.Tensor:
    """Exact inverse of `pack_codes`: uint8 master codes [out, in]."""
    return unpack_planes(packed).contiguous()


def slice_packed(packed: PackedCodes, bits: int, mode: str = DEFAULT_SLICING, dtype: torch.dtype = torch.int32,
                 rows: slice | None = None) -> torch.Tensor:
    """r-bit slice codes [out, in] read from only the planes the layout needs; equals
    `matquant.quant.slicing.slice_codes(codes, c, r, mode)` for modes 'nested' and 'paper' ('extra' = no clamp).
    `dtype=torch.uint8` skips the int32 upcast (fast path); 'extra' may then need int16 (its top level is 2^r)."""
    c = packed.master_bits
    if not 1 <= bits <= c:
        raise ValueError(f"cannot slice {bits} bits out of a {c}-bit master code.")
    p = planes_needed(packed.chunks, bits, mode, c)
    covered = sum(packed.chunks[:p])
    t = unpack_planes(packed, p, rows)
    if bits == c or mode == "nested":
        return (t >> (covered - bits)).to(dtype)
    t = t >> (covered - bits - 1)
    if bits + 1 >= 8:
        t = t.to(torch.int16)  # t + 1 can reach 256
    s = (t + 1) >> 1  # floor(q/2^shift + 1/2) from the top r+1 bits
    if mode == "paper":
        s = s.clamp(max=2**bits - 1)
    return s.to(dtype) if (mode == "paper" or dtype != torch.uint8) else s
