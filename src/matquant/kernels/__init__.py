"""Compute backends for MatQuantLinear. `torch_ref` is the portable reference every other backend is tested against.

- `packing`      nested-exact chunked plane layout of the master codes (2|2|4 by default)
- `cpu`          fast torch path (any device): integer slicing + one multiply-add, per-precision weight cache
- `triton_gemv`  fused dequantize-and-multiply Triton kernel (imports triton; CUDA, or CPU with TRITON_INTERPRET=1)
- `dispatch`     backend selection behind `MatQuantLinear.forward` / `matquant.set_backend`
- `third_party`  mappings/adapters to GemLite and torch tinygemm (GPU adapters untested; see docs/kernels.md)
"""
from matquant.kernels import torch_ref

__all__ = ["torch_ref"]
