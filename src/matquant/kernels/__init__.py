"""Compute backends for MatQuantLinear. `torch_ref` is the portable reference every other backend is tested against."""
from matquant.kernels import torch_ref

__all__ = ["torch_ref"]
