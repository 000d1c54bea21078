"""Memory-true CPU runtime: an r-bit slice held as packed 4-bit codes, multiplied by torch's int4 CPU kernel.

No dense weight of the layer is ever built: the slice is cut from the master codes once per precision, packed
with `torch.ops.aten._convert_weight_to_int4pack_for_cpu` and multiplied by `_weight_int4pack_mm_for_cpu`
(tinygemm's CPU twin; dequant (q − 8)·scale + zero per group, bf16 activations, fp32 accumulation).

- r ≤ 4   one 4-bit plane. int3 and int2 slices stored here run as 4-bit codes with their own (A, B), the memory
          and time of int4 (the kernel has no 2/3-bit variant); the packed backend holds them in `kernels.lowbit`'s
          2/3-bit format instead when that kernel is built and takes the layer.
- r = 5–8 ``int4x2`` (default): the r-bit code q_r is split into hi = q_r >> 4 and lo = q_r & 15, two 4-bit
          planes, y = int4mm(x, hi; 16·A, B + 128·A) + int4mm(x, lo; A, 8·A). Exact in the same sense as the
          4-bit path; 8 bits per weight + two bf16 (scale, zero) pairs per group. ``bf16``: a dense bf16 weight of
          the slice (16 bits per weight; faster for long prompts, see docs/runtime.md).

With W_r = q_r·A + B (``kernels.cpu.slice_params``), the r-bit codes are stored shifted to q_r + 8 − 2^(r−1) (so
their range is centred on the kernel's 8; for r = 4 no shift) with scale = A and zero = B + 2^(r−1)·A: the zero is
then the group's mid-range value, which rounds to bf16 with an error far below a quantization step (an unshifted
int2 code would put zero at B + 8·A, far outside the range, and lose ~1 % to bf16 rounding). With two planes the
lo plane's zero absorbs the bf16 rounding of the hi plane's zero. The kernel takes bf16 activations only at speed
(fp32/fp16 activations run far slower: docs/runtime.md), so fp32/fp16 inputs are cast to bf16 and the output
back: the answer equals the reference slice up to bf16 rounding of activations, scales and zeros, and of each
plane's dequantized value inside the kernel (tests: ≤ 1.2 % of the output's max for r ≤ 4, ≤ 2 % for int4x2).

Constraints of the kernel (a layer outside them is declined: the dispatcher falls back with one warning):
out_features % 16 == 0; group size a multiple of 32 (32/64/128/256 run directly; a larger multiple such as a
per-channel group of 576 runs as groups of the largest of 256/128/64/32 dividing it, scales repeated); slicing
``paper`` or ``nested`` (``extra`` has 2^r + 1 levels: no r-bit code); CPU tensors; activations fp32/bf16/fp16.

Nested slices are stored in the planes layout of `kernels.master_planes` (the layout a precision switch cuts
from the master held as packed planes), byte for byte.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from matquant.kernels.cpu import slice_codes_fast, slice_params

KERNEL_GROUPS = (256, 128, 64, 32)
HIGH_FORMATS = ("int4x2", "bf16")
DEFAULT_HIGH_FORMAT = "int4x2"
ACT_DTYPE = torch.bfloat16
INNER_K_TILES = 2  # the CPU packing's only layout parameter; it does not change the result
_OPS = torch.ops.aten


def available() -> bool:
    return hasattr(_OPS, "_weight_int4pack_mm_for_cpu") and hasattr(_OPS, "_convert_weight_to_int4pack_for_cpu")


def kernel_group(group_size: int) -> int | None:
    """The kernel group size that represents `group_size` exactly (None: it cannot)."""
    for g in KERNEL_GROUPS:
        if group_size % g == 0:
            return g
    return None


def layer_reason(out_features: int, in_features: int, group_size: int, bits: int, master_bits: int,
                 mode: str, high_format: str = DEFAULT_HIGH_FORMAT) -> str | None:
    """Why this layer at this precision cannot run packed (None: it can)."""
    if not available():
        return "this torch build (no _weight_int4pack_mm_for_cpu)"
    if mode not in ("paper", "nested") and bits < master_bits:
        return f"slicing mode {mode!r} (2^r + 1 levels do not fit an r-bit code)"
    if bits > 4 and high_format == "bf16":
        return None
    if out_features % 16:
        return f"out_features={out_features} (the int4 kernel needs a multiple of 16)"
    if kernel_group(group_size) is None:
        return f"group size {group_size} (the int4 kernel needs a multiple of 32)"
    return None


def input_reason(x: torch.Tensor) -> str | None:
    if x.device.type != "cpu":
        return f"{x.device.type} tensors (the packed runtime is CPU-only; use backend 'triton' or 'cpu')"
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"{x.dtype} activations (fp32, bf16 or fp16 only)"
    return None


@dataclass
class PackedSlice:
    """One precision of one layer, ready for the kernel. `parts`: (packed int4 codes, bf16 scales_and_zeros
    [G', out, 2]) per 4-bit plane; `dense`: the bf16 weight of the ``bf16`` high-bit format instead."""

    bits: int
    mode: str
    out_features: int
    in_features: int
    group: int  # kernel group size
    parts: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    dense: torch.Tensor | None = None

    @property
    def kind(self) -> str:
        return "bf16" if self.dense is not None else ("int4" if len(self.parts) == 1 else "int4x2")

    def tensors(self) -> list[torch.Tensor]:
        return [self.dense] if self.dense is not None else [t for p in self.parts for t in p]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _scales_zeros(scale: torch.Tensor, zero: torch.Tensor, group_size: int, group: int) -> torch.Tensor:
    """tinygemm's [G', out, 2] bf16 table from per-group fp32 scale and zero [out, G]."""
    rep = group_size // group
    if rep > 1:
        scale, zero = scale.repeat_interleave(rep, 1), zero.repeat_interleave(rep, 1)
    return torch.stack([scale.t(), zero.t()], dim=-1).to(ACT_DTYPE).contiguous()


def pack4(q: torch.Tensor) -> torch.Tensor:
    return _OPS._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), INNER_K_TILES)


def pack_slice(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, master_bits: int, bits: int,
               mode: str, group_size: int, high_format: str = DEFAULT_HIGH_FORMAT) -> PackedSlice:
    """Cut the r-bit slice out of uint8 master codes [out, in] and pack it for the kernel (see module doc)."""
    if high_format not in HIGH_FORMATS:
        raise ValueError(f"unknown high-bit format {high_format!r}; choose one of {', '.join(HIGH_FORMATS)}.")
    n, k = codes.shape
    reason = layer_reason(n, k, group_size, bits, master_bits, mode, high_format)
    if reason is not None:
        raise ValueError(f"this layer cannot run packed: {reason}.")
    a, b = slice_params(scales, zeros, master_bits, bits, mode)  # fp32 [out, G]
    q = slice_codes_fast(codes, master_bits, bits, mode)
    if bits > 4 and high_format == "bf16":
        qf = q.reshape(n, -1, group_size).to(torch.float32)
        w = torch.addcmul(b.unsqueeze(-1), qf, a.unsqueeze(-1)).reshape(n, k).to(ACT_DTYPE)
        return PackedSlice(bits, mode, n, k, group_size, dense=w)
    g = kernel_group(group_size)
    if mode == "nested" or bits >= master_bits:  # the planes layout: same bytes as a switch from MasterPlanes
        top = left_aligned(codes, master_bits)
        if bits <= 4:
            planes = [pack4((top >> 4) & nibble_mask(bits))]
        else:
            planes = [pack4(top >> 4), pack4(top & 15 & nibble_mask(bits - 4))]
        tables = nested_tables(scales, zeros, master_bits, bits, group_size, g)
        return PackedSlice(bits, mode, n, k, g, parts=list(zip(planes, tables)))
    q = q.to(torch.int32)
    if bits <= 4:  # codes centred on the kernel's 8: zero = the group's mid-range value, small in bf16
        h = 2 ** (bits - 1)
        parts = [(pack4(q + (8 - h)), _scales_zeros(a, b + h * a, group_size, g))]
    else:
        h = 2 ** (bits - 5)  # hi plane: q >> 4 in 0 .. 2^(r-4) - 1, centred the same way
        z_hi = (b + 16 * h * a).to(ACT_DTYPE).float()
        z_lo = 8 * a + (b + 16 * h * a - z_hi)  # the lo plane's zero absorbs the hi zero's bf16 rounding
        parts = [(pack4((q >> 4) + (8 - h)), _scales_zeros(16 * a, z_hi, group_size, g)),
                 (pack4(q & 15), _scales_zeros(a, z_lo, group_size, g))]
    return PackedSlice(bits, mode, n, k, g, parts=parts)


def nibble_mask(r: int) -> int:
    """The top r bits of a nibble (r = 0..4)."""
    return (0xF0 >> r) & 0xF


def left_aligned(codes: torch.Tensor, master_bits: int) -> torch.Tensor:
    """Q = q << (8 − c) as uint8: the nested r-bit code is Q >> (8 − r)."""
    return codes.to(torch.uint8) << (8 - master_bits)


def _nested_zero(scales: torch.Tensor, zeros: torch.Tensor, master_bits: int, bits: int) -> torch.Tensor:
    """fp32 [out, G] zero of the planes layout's hi plane: the weight at nibble 8,
    W = α·(K_r − z) with K_r = (2^(c−r) − 1)/2 + 2^(c−1) (bucket centre + 8 nibble steps of α·2^(c−4))."""
    s = master_bits - bits
    k_r = (2**s - 1) / 2.0 + 2.0 ** (master_bits - 1)
    return torch.rsub(zeros.float(), k_r).mul_(scales)  # fp32 in place: α is promoted exactly


def _table(like: torch.Tensor | None, scale: torch.Tensor | None, zero: torch.Tensor, group_size: int,
           group: int) -> torch.Tensor:
    """A [G', out, 2] bf16 table: from scratch, or `like` cloned with its zero column replaced by `zero`
    (bf16 [out, G]; the scale column, r-independent, is kept)."""
    if like is None:
        return _scales_zeros(scale, zero, group_size, group)
    rep = group_size // group
    table = like.clone()
    table[..., 1].copy_((zero.repeat_interleave(rep, 1) if rep > 1 else zero).t())
    return table


def nested_tables(scales: torch.Tensor, zeros: torch.Tensor, master_bits: int, bits: int, group_size: int,
                   group: int, like: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
    """bf16 (scale, zero) tables of the planes layout (see module doc). The scale columns do not depend on r
    (α·2^(c−4) for the hi plane, α·2^(c−8) for lo), so with `like` (the tables of another planes-layout slice of
    the same layer) only the zero columns are computed: a switch is then a clone and one column write per plane."""
    c = master_bits
    like = like or []
    z = _nested_zero(scales, zeros, c, bits)
    z_hi = z.to(ACT_DTYPE)
    hi = _table(like[0], None, z_hi, group_size, group) if like else _table(
        None, scales.float() * 2.0 ** (c - 4), z_hi, group_size, group)
    if bits <= 4:
        return [hi]
    # the lo plane's zero absorbs the hi zero's bf16 rounding
    z_lo = z.sub_(z_hi.float()).add_(scales, alpha=8 * 2.0 ** (c - 8))
    lo = _table(like[1], None, z_lo.to(ACT_DTYPE), group_size, group) if len(like) > 1 else _table(
        None, scales.float() * 2.0 ** (c - 8), z_lo, group_size, group)
    return [hi, lo]


def linear(x: torch.Tensor, ps: PackedSlice, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x · W_rᵀ + b for a PackedSlice; output in x's dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).to(ACT_DTYPE).contiguous()
    if ps.dense is not None:
        y = torch.nn.functional.linear(x2, ps.dense)
    else:
        y = None
        for packed, sz in ps.parts:  # two planes (r > 4) are summed in fp32
            part = _OPS._weight_int4pack_mm_for_cpu(x2, packed, ps.group, sz)
            y = part if y is None else y.to(torch.float32).add_(part)
    y = y.to(x.dtype)
    if bias is not None:
        y = y.add_(bias.to(x.dtype))
    return y.reshape(*shape[:-1], ps.out_features)
