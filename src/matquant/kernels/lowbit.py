"""int2 and int3 slices at their own size: the low-bit resident format and its fused CPU kernel.

The r-bit slice W_r = q_r·A + B (``kernels.cpu.slice_params``, per group) is held as

- ``codes``  uint8 [ceil(N/64), K/4, 64]: a 2-bit plane, 4 codes per byte. Per block of 64 output rows and per
  "k-quad" (columns 4kq .. 4kq+3), byte 4i + b holds at bits 2s..2s+1 the 2-bit code of row 64·blk + 16s + i,
  column 4kq + b (rows past N are zero padding);
- ``hbits``  (int3 only) uint8 [ceil(N/64), K/4, 32]: four 64-bit little-endian masks per k-quad, mask s bit 4i + b
  = the low bit of that int3 code. The int3 code is 2·p + h (p = the 2-bit plane, h = the bit), so a nested int3
  slice's 2-bit plane is the nested int2 slice itself: 3 bits per weight, and int2 + int3 held side by side share it;
- ``params`` fp16 [ceil(N/64), G, 2, 64]: per group and row A, then M = B + A·(2^r − 1)/2 (the group's mid-range
  weight: small, so its fp16 rounding is far below a quantization step); the kernel uses B = M − A·(2^r − 1)/2.

So an int2 slice costs 2 + 32/g bits per weight (2.5 at g = 64) and int3 3 + 32/g (3.5), against 4.5 for the int4
slice. In this layout a 64-byte load unpacks by one shift-and-mask per 2-bit position into four registers of 64
codes, each register the 4 columns of one k-quad for 16 consecutive rows: exactly the operand of an integer dot
product (x86 ``vpdpbusd``, 4 unsigned bytes times 4 signed bytes per 32-bit lane).

The kernel (``csrc/lowbit.cpp``, built on first use by `torch.utils.cpp_extension`; llama.cpp's design):
activations are quantized per token to int8 in blocks of ``act_block`` = the kernel group (32/64/128/256 dividing
the group size): d = max|x| / 127, x̂ = d·rint(x / d); per block the int32 sums Σ q·x̂_int are scaled by A·d and the
zero term B·d·Σ x̂_int is added (so no dense weight and no float weight is ever formed). The answer is
exactly F.linear(x̂, W_r) with A and M rounded to fp16, up to fp32 summation order (`reference_linear` computes that
in torch; tests bound both differences). Paths picked by a runtime CPU check: AVX-512 VNNI, AVX2 (``vpmaddubsw``),
portable C++.

Switching: a nested int2/int3 slice is cut from the master's hi plane (`kernels.master_planes`, torch's int4
packing) by one C++ pass (`from_planes`: a byte transpose and a shift-and-mask per byte), after a once-per-process
check that this torch build packs as assumed (`planes_convertible`); otherwise, and for ``paper`` slices, the slice
is packed from the uint8 codes (`pack_codes`).

No compiler (or ``MATQUANT_LOWBIT=0``): `available()` is False after one warning, and the packed runtime keeps
int2/int3 in the int4 format as before (correct and fast, but the memory of int4).
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from matquant.kernels.cpu import slice_codes_fast, slice_params
from matquant.kernels.cpu_packed import kernel_group

BITS = (2, 3)
ROWS = 64  # output rows per block
ENV_SWITCH = "MATQUANT_LOWBIT"  # "0": never build or use the extension
ISA_NAMES = {0: "portable C++", 1: "AVX2", 2: "AVX-512 VNNI"}
SOURCE = Path(__file__).with_name("csrc") / "lowbit.cpp"
_state: dict[str, object] = {}


# ----------------------------------------------------------------------------------------------- the extension
def _build_dir() -> Path:
    """A per-(source, torch version) folder in the user's cache (XDG_CACHE_HOME or ~/.cache)."""
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()).hexdigest()[:12]
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "matquant" / "torch_extensions" / f"lowbit-{digest}"


def _build() -> None:
    """JIT-build and load csrc/lowbit.cpp (registers torch.ops.matquant_lowbit.*); raises on failure."""
    from torch.utils import cpp_extension

    folder = _build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "matquant_lowbit.so").exists():
        print(f"matquant: building the int2/int3 CPU kernel once into {folder} (a C++ compile; later runs load it)",
              file=sys.stderr, flush=True)
    # -fopenmp: at::parallel_for is inline and runs serially without it (the library resolves to the OpenMP
    # runtime torch already loaded, libgomp.so.1)
    cpp_extension.load(name="matquant_lowbit", sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp"],
                       extra_ldflags=["-fopenmp"], build_directory=str(folder), is_python_module=False, verbose=False)


def available() -> bool:
    """Whether the low-bit kernel is built and loaded (building it on the first call; one warning if it cannot)."""
    if "ok" not in _state:
        reason = None
        if os.environ.get(ENV_SWITCH, "1") == "0":
            reason = f"{ENV_SWITCH}=0"
        else:
            try:
                if not _loaded_already():
                    _build()
                _register_fake()
            except Exception as e:  # no compiler, no ninja, a failed build: fall back, say so once
                reason = f"the C++ extension could not be built ({type(e).__name__}: {str(e).strip()[:200]})"
        _state["ok"] = reason is None
        if reason is not None:
            warnings.warn(f"matquant low-bit kernel unavailable: {reason}. int2/int3 slices run in the int4 format "
                          "instead (correct, but they use int4's memory and time). Install a C++ compiler (g++) and "
                          "ninja (pip install ninja) to build it. This warning is shown once.", RuntimeWarning,
                          stacklevel=3)
    return bool(_state["ok"])


def _loaded_already() -> bool:
    try:
        return hasattr(torch.ops.matquant_lowbit, "mm")
    except (AttributeError, RuntimeError):
        return False


def _register_fake() -> None:
    """Shape-only implementation so that torch.compile (nn/compiled.py) calls the kernel as one extern op."""
    if _state.get("fake"):
        return
    _state["fake"] = True

    @torch.library.register_fake("matquant_lowbit::mm")
    def _(x, codes, hbits, params, bits, group, act_block, n, isa):
        return x.new_empty((x.shape[0], n))


def isa() -> str:
    """The instruction set the kernel runs with on this CPU."""
    return ISA_NAMES[int(torch.ops.matquant_lowbit.isa())] if available() else "unavailable"


def reset() -> None:
    """Forget whether the extension is available (tests: re-run `available()` after monkeypatching)."""
    _state.pop("ok", None)
    planes_convertible.cache_clear()


# ----------------------------------------------------------------------------------------------- the format
def act_block(group_size: int) -> int | None:
    """The activation quantization block for a group size: the largest of 256/128/64/32 dividing it."""
    return kernel_group(group_size)


def layer_reason(out_features: int, in_features: int, group_size: int, bits: int, mode: str,
                 master_bits: int) -> str | None:
    """Why this layer cannot hold its r-bit slice in the low-bit format (None: it can)."""
    if bits not in BITS:
        return f"int{bits} (the low-bit format holds int2 and int3)"
    if mode not in ("paper", "nested") and bits < master_bits:
        return f"slicing mode {mode!r}"
    if act_block(group_size) is None or in_features % group_size:
        return f"group size {group_size} (a multiple of 32 dividing in_features is needed)"
    if out_features % 2:
        return f"out_features={out_features} (odd)"
    return None


def smaller_than_int4(out_features: int, in_features: int, group_size: int, bits: int) -> bool:
    """Whether the low-bit slice (rows padded to a multiple of 64) is smaller than the same slice in the int4
    format (a layer of few rows may not be: the packed runtime then keeps it as int4)."""
    int4_bytes = out_features * in_features // 2 + in_features // act_block(group_size) * out_features * 4
    return slice_bytes(out_features, in_features, group_size, bits) < int4_bytes


@dataclass
class LowbitSlice:
    """One int2/int3 precision of one layer in the low-bit format (module doc)."""

    bits: int
    mode: str
    out_features: int
    in_features: int
    group: int  # the slice's group size (A, M per group)
    codes: torch.Tensor
    hbits: torch.Tensor | None
    params: torch.Tensor
    parts: tuple = ()  # not a planes-layout slice of `cpu_packed` (master_planes.planes_layout reads this)
    dense = None

    @property
    def kind(self) -> str:
        return f"int{self.bits}"

    def tensors(self) -> list[torch.Tensor]:
        return [self.codes, self.params] + ([self.hbits] if self.hbits is not None else [])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def slice_bytes(out_features: int, in_features: int, group_size: int, bits: int) -> int:
    """Resident bytes of a LowbitSlice (for memory budgets)."""
    nblk = -(-out_features // ROWS)
    per_block = in_features // 4 * (64 + (32 if bits == 3 else 0)) + in_features // group_size * 2 * 64 * 2
    return nblk * per_block


def make_params(a: torch.Tensor, b: torch.Tensor, bits: int) -> torch.Tensor:
    """fp16 [nblk, G, 2, 64] (A, M = B + A·(2^r − 1)/2) from fp32 A, B [N, G]; padded rows are 0."""
    n, g = a.shape
    nblk = -(-n // ROWS)
    mid = a.float().mul((2**bits - 1) / 2.0).add_(b.float())
    pair = torch.stack([a, mid], dim=1).to(torch.float16)  # [N, 2, G]
    if nblk * ROWS > n:
        pair = torch.nn.functional.pad(pair, (0, 0, 0, 0, 0, nblk * ROWS - n))
    return pair.view(nblk, ROWS, 2, g).permute(0, 3, 2, 1).contiguous()


def pack_codes(q: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(codes, hbits) of r-bit integer codes q [N, K] (values < 2^r) in the low-bit layout (pure torch)."""
    n, k = q.shape
    nblk = -(-n // ROWS)
    qp = torch.zeros(nblk * ROWS, k, dtype=torch.uint8)
    qp[:n] = q.to(torch.uint8)
    p = qp >> 1 if bits == 3 else qp
    v = p.view(nblk, 4, 16, k // 4, 4).permute(0, 3, 2, 4, 1)  # [blk, kq, i, b, s]
    codes = (v[..., 0] | v[..., 1] << 2 | v[..., 2] << 4 | v[..., 3] << 6).reshape(nblk, k // 4, 64).contiguous()
    if bits != 3:
        return codes, None
    h = (qp & 1).view(nblk, 4, 16, k // 4, 4).permute(0, 3, 1, 2, 4).reshape(nblk, k // 4, 4, 8, 8)
    weights = (2 ** torch.arange(8, dtype=torch.int32)).view(1, 1, 1, 1, 8)
    hbits = (h.to(torch.int32) * weights).sum(-1).to(torch.uint8).reshape(nblk, k // 4, 32).contiguous()
    return codes, hbits


def unpack_codes(ls: LowbitSlice) -> torch.Tensor:
    """The r-bit integer codes [N, K] of a LowbitSlice (tests, the reference path)."""
    nblk, kq, _ = ls.codes.shape
    c = ls.codes.view(nblk, kq, 16, 4)
    p = torch.stack([(c >> (2 * s)) & 3 for s in range(4)], dim=1)  # [blk, s, kq, i, b]
    p = p.permute(0, 1, 3, 2, 4).reshape(nblk * ROWS, kq * 4)
    if ls.hbits is not None:
        bits = (ls.hbits.view(nblk, kq, 4, 8, 1) >> torch.arange(8, dtype=torch.uint8)) & 1  # [blk, kq, s, byte, bit]
        h = bits.reshape(nblk, kq, 4, 16, 4).permute(0, 2, 3, 1, 4).reshape(nblk * ROWS, kq * 4)
        p = p * 2 + h
    return p[: ls.out_features]


def dequantized_params(ls: LowbitSlice) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 (A, B) [N, G] as the kernel uses them (A and M rounded to fp16)."""
    pr = ls.params.float().permute(0, 3, 2, 1).reshape(-1, 2, ls.params.shape[1])[: ls.out_features]
    a, m = pr[:, 0], pr[:, 1]
    return a, m - a * ((2**ls.bits - 1) / 2.0)


def quantize_activations(x: torch.Tensor, block: int) -> torch.Tensor:
    """x̂: x [M, K] rounded to int8 per block of `block` as the kernel does it (d = max|x|/127, rint(x/d)), in fp32."""
    m, k = x.shape
    xb = x.float().reshape(m, k // block, block)
    d = xb.abs().amax(-1, keepdim=True) / 127.0
    q = torch.where(d > 0, torch.round(xb / torch.where(d > 0, d, 1.0)), 0.0).clamp_(-127, 127)
    return (q * d).reshape(m, k)


def reference_linear(x: torch.Tensor, ls: LowbitSlice) -> torch.Tensor:
    """What the kernel computes, in torch (dense, for tests): F.linear(x̂, q·A + B) in fp32."""
    a, b = dequantized_params(ls)
    q = unpack_codes(ls).float().view(ls.out_features, -1, ls.group)
    w = (q * a.unsqueeze(-1) + b.unsqueeze(-1)).view(ls.out_features, ls.in_features)
    x2 = x.reshape(-1, ls.in_features)
    return torch.nn.functional.linear(quantize_activations(x2, act_block(ls.group)), w)


# ----------------------------------------------------------------------------------------------- building slices
def pack_slice(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, master_bits: int, bits: int,
               mode: str, group_size: int) -> LowbitSlice:
    """The r-bit slice of uint8 master codes [N, K] in the low-bit format."""
    n, k = codes.shape
    reason = layer_reason(n, k, group_size, bits, mode, master_bits)
    if reason is not None:
        raise ValueError(f"this layer cannot hold a low-bit slice: {reason}.")
    a, b = slice_params(scales, zeros, master_bits, bits, mode)
    c, h = pack_codes(slice_codes_fast(codes, master_bits, bits, mode), bits)
    return LowbitSlice(bits, mode, n, k, group_size, c, h, make_params(a, b, bits))


def from_planes(hi: torch.Tensor, out_features: int, in_features: int, scales: torch.Tensor, zeros: torch.Tensor,
                master_bits: int, bits: int, group_size: int) -> LowbitSlice:
    """The nested r-bit slice cut from a MasterPlanes hi plane (one C++ pass; needs `planes_convertible()`)."""
    outs = torch.ops.matquant_lowbit.from_planes(hi, out_features, in_features, bits)
    a, b = slice_params(scales, zeros, master_bits, bits, "nested")
    return LowbitSlice(bits, "nested", out_features, in_features, group_size, outs[0],
                       outs[1] if bits == 3 else None, make_params(a, b, bits))


@functools.lru_cache(maxsize=1)
def planes_convertible() -> bool:
    """Whether `from_planes` reads this torch build's int4 packing right (checked once: full and partial blocks)."""
    if not available():
        return False
    from matquant.kernels.cpu_packed import left_aligned, pack4

    gen = torch.Generator().manual_seed(0)
    try:
        for n, k in ((128, 64), (80, 96), (48, 32)):
            codes = torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=gen)
            hi = pack4(left_aligned(codes, 8) >> 4)
            for bits in BITS:
                got = torch.ops.matquant_lowbit.from_planes(hi, n, k, bits)
                want = pack_codes(codes >> (8 - bits), bits)
                if not torch.equal(got[0], want[0]) or (bits == 3 and not torch.equal(got[1], want[1])):
                    return False
    except RuntimeError:
        return False
    return True


def linear(x: torch.Tensor, ls: LowbitSlice, bias: torch.Tensor | None = None, isa: int = -1) -> torch.Tensor:
    """y = x · W_rᵀ + b through the kernel; output in x's dtype. `isa`: force a path (tests; -1 = the best)."""
    if not _state.get("ok") and not available():
        raise RuntimeError("the matquant low-bit kernel is unavailable (see the warning); hold int2/int3 in the "
                           "int4 format instead (kernels.cpu_packed).")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    y = torch.ops.matquant_lowbit.mm(x2, ls.codes, ls.hbits, ls.params, ls.bits, ls.group, act_block(ls.group),
                                     ls.out_features, isa)
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
    if bias is not None:
        y = y.add_(bias.to(x.dtype))
    return y.reshape(*shape[:-1], ls.out_features)
