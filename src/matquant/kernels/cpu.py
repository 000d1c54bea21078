"""Fast torch path (CPU, or any device): slice in integer arithmetic, one fused multiply-add dequantization,
dense matmul; optionally caches the dequantized weight of every precision used.

The r-bit slice of the master codes is an affine function of the r-bit code q_r with per-group constants:

    W = q_r · A + B,   A = α·2^s,   B = α·(c − z)        (s = master_bits − r)

with c = (2^s − 1)/2 (the bucket centre) in ``nested`` mode and c = 0 in ``paper``/``extra``. This equals
`torch_ref.dequantize_slice` (α·(2^s·q_r + c − z)) up to fp32 rounding (tested). The same A, B feed the Triton
kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from matquant.quant.slicing import check_slicing


def slice_params(scales: torch.Tensor, zeros: torch.Tensor, master_bits: int, bits: int, mode: str
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group (A, B), fp32 [out, n_groups], such that the r-bit slice dequantizes to q_r·A + B."""
    s = master_bits - bits
    alpha = scales.float()
    centre = (2**s - 1) / 2.0 if (mode == "nested" and s > 0) else 0.0
    return alpha * float(2**s), alpha * (centre - zeros.float())


def slice_codes_fast(codes: torch.Tensor, master_bits: int, bits: int, mode: str) -> torch.Tensor:
    """`slice_codes` without the int32 upcast (uint8 arithmetic where it cannot overflow)."""
    s = master_bits - bits
    if s == 0:
        return codes
    if mode == "nested":
        return codes >> s
    q = codes if s > 1 else codes.to(torch.int16)  # (q >> 0) + 1 can reach 256 when s == 1
    out = ((q >> (s - 1)) + 1) >> 1
    return out.clamp_(max=2**bits - 1) if mode == "paper" else out


BLOCK_ELEMENTS = 1 << 18  # rows are dequantized in blocks of ~256K weights (1 MiB fp32): cache-resident (docs/kernels.md)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, master_bits: int,
               bits: int, mode: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dequantized [out, in] weight of the r-bit slice, from uint8 master codes."""
    check_slicing(mode)
    n, k = codes.shape
    g = scales.shape[1]
    a, b = slice_params(scales, zeros, master_bits, bits, mode)
    a, b = a.unsqueeze(-1), b.unsqueeze(-1)
    out = torch.empty(n, k, dtype=dtype, device=scales.device)
    step = max(1, BLOCK_ELEMENTS // max(k, 1))
    for i in range(0, n, step):
        rows = slice(i, min(i + step, n))
        q = slice_codes_fast(codes[rows], master_bits, bits, mode)
        qf = q.reshape(-1, g, k // g).to(torch.float32)
        blk = out[rows].view(-1, g, k // g)
        if dtype == torch.float32:
            torch.addcmul(b[rows], qf, a[rows], out=blk)
        else:
            blk.copy_(torch.addcmul(b[rows], qf, a[rows]))
    return out


class WeightCache:
    """Dequantized weights keyed by (bits, mode, dtype, device). `max_entries=1` keeps only the latest
    precision (what the torch backend does); larger values make switching between cached precisions free,
    at the memory cost of one dense weight per entry."""

    def __init__(self, max_entries: int = 1):
        self.max_entries = max_entries
        self._store: dict[tuple, torch.Tensor] = {}

    def get(self, key: tuple, make) -> torch.Tensor:
        w = self._store.get(key)
        if w is None:
            w = make()
            if self.max_entries > 0:
                while len(self._store) >= self.max_entries:
                    self._store.pop(next(iter(self._store)))
                self._store[key] = w
        return w

    def clear(self) -> None:
        self._store.clear()

    def items(self):
        return self._store.items()

    def __len__(self) -> int:
        return len(self._store)


def linear(x: torch.Tensor, codes, scales, zeros, master_bits: int, bits: int, mode: str,
           bias: torch.Tensor | None = None, cache: WeightCache | None = None) -> torch.Tensor:
    """y = x · W_rᵀ + b with W_r dequantized by `dequantize` (looked up in / stored to `cache` if given)."""
    def make():
        return dequantize(codes, scales, zeros, master_bits, bits, mode, x.dtype)

    w = cache.get((bits, mode, x.dtype, x.device), make) if cache is not None else make()
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))
