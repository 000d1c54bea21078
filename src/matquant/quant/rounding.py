"""Rounding used throughout MatQuant: round-half-up, floor(x + 0.5), as in the paper.

`torch.round` rounds half to even and is NOT used for quantization anywhere in this package.
"""
import torch


def round_half_up(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(x + 0.5)


def round_half_up_ste(x: torch.Tensor) -> torch.Tensor:
    """floor(x + 0.5) in the forward pass, identity gradient (straight-through estimator)."""
    return x + (torch.floor(x + 0.5) - x).detach()


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.floor(x) - x).detach()
