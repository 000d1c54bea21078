"""Slicing an int-c master code to its r most significant bits.

Three modes, all returning values in *master code units* so that dequantization is always α·(value − z)
with the master's α and z (the same for every r):

- ``paper``  (MatQuant eq. 3): S(q, r) = clamp(floor(q / 2^(c−r) + 0.5), 0, 2^r − 1) · 2^(c−r).
  Round-half-up, then clamp. Not a pure bit prefix of q (rounding can carry into the next bucket).
- ``extra``  (Extra-Precision MatQuant): the same without the clamp, so q_r ∈ 0..2^r (2^r + 1 levels);
  the top level overflows r bits and must be stored separately (see `overflow_fraction`).
- ``nested`` (truncate + bucket centre): q_r = q >> (c−r), value 2^(c−r)·q_r + (2^(c−r) − 1)/2.
  q_r is exactly the top r bits of q, so the r-bit model is a pure prefix of the stored int-c codes.

For r == c every mode is the identity.
"""
from __future__ import annotations

import torch

from matquant.quant.rounding import floor_ste, round_half_up_ste

SLICING_MODES = ("paper", "nested", "extra")
# What `quantize` builds for when not told: nested, the better mode at 2-4 bits on SmolLM2 for RTN, MatGPTQ, OmniQuant
# and QAT (measured in docs/results.md), and its slices are exact bit prefixes. "paper" is one flag away.
DEFAULT_SLICING = "nested"  # the ONE default: every signature that defaults a slicing mode refers to this name


def check_slicing(mode: str) -> str:
    if mode not in SLICING_MODES:
        raise ValueError(f"unknown slicing mode {mode!r}; choose one of {', '.join(SLICING_MODES)}.")
    return mode


def _check(c: int, r: int) -> int:
    if not (1 <= r <= c <= 8):
        raise ValueError(f"cannot slice {r} bits out of a {c}-bit master code: need 1 <= bits <= master bits ({c}).")
    return c - r


def slice_codes(q: torch.Tensor, c: int, r: int, mode: str) -> torch.Tensor:
    """r-bit integer codes of master codes q (int tensor or uint8). `extra` may return 2^r (overflow)."""
    shift = _check(c, r)
    check_slicing(mode)
    qi = q.to(torch.int32)
    if shift == 0:
        return qi
    if mode == "nested":
        return qi >> shift
    s = (qi + (1 << (shift - 1))) >> shift  # floor(q / 2^shift + 0.5), exact in integers
    if mode == "paper":
        s = s.clamp(0, 2**r - 1)
    return s


def codes_to_master_units(qr: torch.Tensor, c: int, r: int, mode: str) -> torch.Tensor:
    """Map r-bit codes back to (float) master-code units: the value that is dequantized with α, z."""
    shift = _check(c, r)
    v = qr.float() * float(2**shift)
    if mode == "nested" and shift > 0:
        v = v + (2**shift - 1) / 2.0
    return v


def slice_master(q: torch.Tensor, c: int, r: int, mode: str) -> torch.Tensor:
    """Sliced value of master codes q in master units (float32)."""
    return codes_to_master_units(slice_codes(q, c, r, mode), c, r, mode)


def slice_master_ste(q: torch.Tensor, c: int, r: int, mode: str) -> torch.Tensor:
    """Differentiable (straight-through) slicing of float master codes q, for training."""
    shift = _check(c, r)
    check_slicing(mode)
    if shift == 0:
        return q
    step = float(2**shift)
    if mode == "nested":
        return floor_ste(q / step) * step + (step - 1) / 2.0
    s = round_half_up_ste(q / step)
    if mode == "paper":
        s = s.clamp(0, 2**r - 1)
    return s * step


def overflow_fraction(q: torch.Tensor, c: int, r: int, mode: str) -> float:
    """Fraction of weights whose `extra` slice needs the (r+1)-th level 2^r; 0 for the other modes."""
    if mode != "extra" or r == c:
        return 0.0
    return (slice_codes(q, c, r, "extra") == 2**r).float().mean().item()


# Overflowed weights are stored sparsely: a 32-bit flat index each (the level itself is implicit: 2^r).
OVERFLOW_INDEX_BITS = 32


def effective_code_bits(q: torch.Tensor, c: int, r: int, mode: str) -> float:
    """Bits per weight of the codes of an r-bit slice, counting the sparse overflow storage in `extra` mode."""
    return r + OVERFLOW_INDEX_BITS * overflow_fraction(q, c, r, mode)
