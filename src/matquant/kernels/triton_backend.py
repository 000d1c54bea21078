"""The 'triton' backend: the fused dequantize-and-multiply kernel (`kernels.triton_gemv`) for batches of up to
`triton_gemv.MAX_BATCH` tokens with fp16/bf16 activations, on CUDA (or CPU under TRITON_INTERPRET=1); larger
batches (prefill) dequantize once into the 'cpu' backend's cache and run a dense matmul. The kernel reads the
uint8 master codes. Importing this module does not import triton."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from matquant.kernels import cpu
from matquant.kernels.backend import Backend, BackendOptions, warn_fallback
from matquant.kernels.cpu_backend import CpuBackend


class TritonBackend(Backend):
    """`quiet` (what 'auto' uses): a call the kernel does not take goes to the 'cpu' path silently instead of the
    reference path with a warning."""

    name = "triton"

    def __init__(self, options: BackendOptions | None = None, dense: CpuBackend | None = None, quiet: bool = False):
        super().__init__(options)
        self.dense = dense or CpuBackend(self.options)
        self.quiet = quiet
        self.params: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def slice_params(self, layer, bits: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        key = (bits, mode, layer.scales.device)
        if key not in self.params:
            a, b = cpu.slice_params(*layer.group_params(bits, mode), layer.master_bits, bits, mode)
            self.params[key] = (a.contiguous(), b.contiguous())
        return self.params[key]

    def prepare(self, layer, bits: int, mode: str) -> None:
        self.slice_params(layer, bits, mode)

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        from matquant.kernels import triton_gemv as tg

        reason = tg.check_supported(x, layer.bits, layer.slicing, layer.group_size)
        if reason is not None:
            if self.quiet:  # 'auto': the fast torch path is the intended choice for what the kernel does not take
                return self.dense.forward(layer, x)
            warn_fallback("triton", reason)
            return super().forward(layer, x)
        m = x.numel() // max(layer.in_features, 1)
        if m > tg.MAX_BATCH or m == 0:  # prefill: dequantize once (cached) + dense matmul
            return self.dense.forward(layer, x)
        a, b = self.slice_params(layer, layer.bits, layer.slicing)
        y = tg.matmul(x, layer.qweight, a, b, layer.master_bits, layer.bits, layer.slicing, layer.group_size)
        return y if layer.bias is None else y + layer.bias.to(x.dtype)

    def resident_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        yield from self.dense.resident_tensors()
        for key, (a, b) in self.params.items():
            yield f"params.{key[0]}.{key[1]}.a", a
            yield f"params.{key[0]}.{key[1]}.b", b

    def clear(self) -> None:
        self.dense.clear()
        self.params.clear()

    def drop_dense_weights(self) -> None:
        self.dense.drop_dense_weights()
