"""Adapters from a MatQuant slice to third-party int kernels: GemLite (W8/W4/W2) and torch's tinygemm int4.

What is tested (the mappings, on CPU) and what is not (the CUDA-only adapters `make_gemlite_linear`,
`tinygemm_pack_cuda`, used only by lab/benchmarks/bench_kernels_gpu.py, NOT a `set_backend` option), and as of when:
docs/kernels.md, "GemLite and tinygemm".

Both libraries use the HQQ-style affine form W = (W_q − zero)·scale per group, so an r-bit MatQuant slice maps
exactly: scale = α·2^s, zero = (z − c)/2^s with s = 8 − r and c the nested bucket centre ((2^s − 1)/2; 0 in paper
mode). ``extra`` slicing (2^r + 1 levels) does not fit an r-bit kernel.
"""
from __future__ import annotations

import torch

from matquant.quant.slicing import slice_codes

GEMLITE_BITS = (8, 4, 2)


def _check_mode(mode: str) -> None:
    if mode not in ("paper", "nested"):
        raise ValueError(f"slicing mode {mode!r} has no r-bit third-party kernel (use 'paper' or 'nested').")


def gemlite_inputs(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, master_bits: int, bits: int,
                   mode: str, dtype: torch.dtype = torch.float16):
    """(W_q uint8 [out, in] with values < 2^r, scale [out, G], zero [out, G]) with W = (W_q − zero)·scale."""
    _check_mode(mode)
    s = master_bits - bits
    q = slice_codes(codes, master_bits, bits, mode).to(torch.uint8)
    centre = (2**s - 1) / 2.0 if (mode == "nested" and s > 0) else 0.0
    scale = (scales.float() * 2**s).to(dtype)
    zero = ((zeros.float() - centre) / 2**s).to(dtype)
    return q, scale, zero


def make_gemlite_linear(codes, scales, zeros, master_bits: int, bits: int, mode: str, group_size: int,
                        bias: torch.Tensor | None = None, dtype: torch.dtype = torch.float16):
    """UNTESTED (needs CUDA): a gemlite.GemLiteLinear computing the r-bit slice. Inputs must be on the GPU."""
    if bits not in GEMLITE_BITS:
        raise ValueError(f"GemLite has kernels for {GEMLITE_BITS} bits, not {bits}; use matquant's Triton kernel.")
    out_f, in_f = codes.shape
    if in_f % 32 or group_size % 32:
        raise ValueError(f"GemLite needs in_features and group size divisible by 32 (got {in_f}, {group_size}).")
    from gemlite import DType, GemLiteLinear  # imported lazily: needs CUDA at import

    gdt = {torch.float16: DType.FP16, torch.bfloat16: DType.BF16}[dtype]
    q, scale, zero = gemlite_inputs(codes, scales, zeros, master_bits, bits, mode, dtype)
    layer = GemLiteLinear(bits, group_size=group_size, in_features=in_f, out_features=out_f, input_dtype=gdt,
                          output_dtype=gdt)
    layer.pack(q, scale, zero, bias=None if bias is None else bias.to(dtype))
    return layer


def tinygemm_int4_inputs(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, master_bits: int,
                         mode: str, dtype: torch.dtype = torch.bfloat16):
    """(q4 int32 [out, in] in 0..15, scales_and_zeros [G, out, 2]) for tinygemm, whose dequant is
    (q − 8)·scale + zero: scale = α·2^s, zero = α·(c − z) + 8·scale (the int4 slice of the master codes)."""
    _check_mode(mode)
    s = master_bits - 4
    q = slice_codes(codes, master_bits, 4, mode)
    centre = (2**s - 1) / 2.0 if (mode == "nested" and s > 0) else 0.0
    a = scales.float() * 2**s
    b = scales.float() * (centre - zeros.float())
    sz = torch.stack([a.t(), (b + 8 * a).t()], dim=-1).to(dtype).contiguous()
    return q.to(torch.int32), sz


def tinygemm_pack_cuda(q4: torch.Tensor, inner_k_tiles: int = 8) -> torch.Tensor:
    """UNTESTED (needs CUDA): torch's CUDA int4 packing, from uint8 [out, in/2] (even k in the high nibble)."""
    q = q4.to(torch.int32)
    u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8)
    return torch.ops.aten._convert_weight_to_int4pack(u8, inner_k_tiles)
