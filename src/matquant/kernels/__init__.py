"""Compute backends for MatQuantLinear: one object per layer (`backend.Backend`: prepare, forward, resident_tensors).
`torch_ref` is the portable reference every other backend is tested against.

- `backend`, `dispatch`  the interface and the reference path; the backends by name and 'auto'
- `cpu`, `cpu_backend`   fast torch path (any device): integer slicing + one multiply-add, per-precision weight cache
- `triton_gemv`, `triton_backend`  fused dequantize-and-multiply Triton kernel (CUDA, or CPU with TRITON_INTERPRET=1)
- `cpu_packed`, `packed_backend`  the memory-true CPU runtime: slices as packed 4-bit codes, torch's int4 CPU kernel
- `lowbit` (+ `csrc/lowbit.cpp`)  int2/int3 slices at 2/3 bits per weight and their C++ kernel (built on first use)
- `master_planes`  the one packed layout of the master codes (two 4-bit planes; a nested switch is one AND)
- `third_party`  mappings/adapters to GemLite and torch tinygemm (GPU adapters untested; see docs/kernels.md)
"""
from matquant.kernels import torch_ref

__all__ = ["torch_ref"]
