"""Reference backend: dequantize the r-bit slice with torch ops, then a dense matmul. Runs anywhere."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from matquant.quant.minmax import dequantize_codes
from matquant.quant.slicing import slice_master


def dequantize_slice(
    codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, master_bits: int, bits: int, mode: str,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    return dequantize_codes(slice_master(codes, master_bits, bits, mode), scales, zeros).to(dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)
