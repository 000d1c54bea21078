"""The 'cpu' backend: `kernels.cpu` (integer slicing + one multiply-add, dense matmul) with a per-layer cache of
the dequantized weight of up to ``cache_precisions`` precisions. Runs on any device."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from matquant.kernels import cpu
from matquant.kernels.backend import Backend, BackendOptions


class CpuBackend(Backend):
    name = "cpu"

    def __init__(self, options: BackendOptions | None = None):
        super().__init__(options)
        self.weights = cpu.WeightCache(self.options.cache_precisions)

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        return cpu.linear(x, layer.qweight, *layer.group_params(), layer.master_bits, layer.bits, layer.slicing,
                          layer.bias, cache=self.weights if layer.cache_dequantized else None)

    def resident_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        for key, w in self.weights.items():
            yield f"weights.{key[0]}.{key[1]}", w

    def clear(self) -> None:
        self.weights.clear()

    def drop_dense_weights(self) -> None:
        self.weights.clear()
