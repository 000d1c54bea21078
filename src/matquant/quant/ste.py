"""Fake quantization with straight-through estimators, for training (QAT, OmniQuant)."""
from __future__ import annotations

import torch

from matquant.quant.minmax import grouped
from matquant.quant.rounding import round_half_up_ste
from matquant.quant.slicing import slice_master_ste


def fake_quant_ste(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, master_bits: int, bits: int,
                   mode: str) -> torch.Tensor:
    """α·(S(Q(w), r) − z) with STE through every rounding; gradients flow to w, α and z.

    w: [out, in]; scale, zero: [out, n_groups].
    """
    gs = w.shape[1] // scale.shape[1]
    g = grouped(w, gs)
    s = scale.unsqueeze(-1)
    z = zero.unsqueeze(-1)
    q = round_half_up_ste(g / s + z).clamp(0, 2**master_bits - 1)
    q = slice_master_ste(q, master_bits, bits, mode)
    return (s * (q - z)).reshape(w.shape)
