"""The block-wise Hessian pass: every target layer handed its weight and H = 2XᵀX/N of its calibration inputs.

GPTQ and MatGPTQ quantize each layer from (W, H); the slice-own group parameters of RTN, OmniQuant and QAT are
fitted from the same pair after the method (algorithms/slice_params.py). The pass runs block by block
(`blocks.run_blockwise`); in each block the targets are taken in GPTQ's *true sequential* order (groups that share
an input, e.g. [q,k,v] → [o] → [gate,up] → [down], each group's inputs collected after the previous group was
replaced), so every layer's H comes from the inputs of the already-quantized model.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from matquant.algorithms.blocks import BlockContext, block_stream, new_results, run_blockwise
from matquant.models.targets import linear_weight
from matquant.quant.minmax import QuantizedWeight, dequantize_codes


class HessianAccumulator:
    """Running H = 2 XᵀX / N over every token seen (float32, on the inputs' device)."""

    def __init__(self):
        self.H: torch.Tensor | None = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        m = x.shape[0]
        if self.H is None:
            self.H = torch.zeros(x.shape[1], x.shape[1], device=x.device)
        self.H.mul_(self.n / (self.n + m))
        self.n += m
        x = x * (2.0 / self.n) ** 0.5
        self.H.addmm_(x.t(), x)


LayerFn = Callable[[str, torch.Tensor, torch.Tensor], QuantizedWeight]  # (name, W [out, in] float32, H) -> result


def hessian_pass(model, targets, calib, quantize_layer: LayerFn, *, true_sequential: bool = True, device=None,
                 batch_size: int = 1, progress: bool = True, desc: str = "GPTQ",
                 propagate=None) -> dict[str, QuantizedWeight]:
    """Run `quantize_layer(name, W [out,in] on device, H) -> QuantizedWeight` block by block.

    The layer's weight is replaced in place by `propagate(qw, W)` (default: the dequantized master weight), so later
    layers and blocks see the quantized model's activations; returns {name: QuantizedWeight} on the model's
    original device.
    """
    out: dict[str, QuantizedWeight] = new_results(model)

    def per_block(ctx: BlockContext):
        groups = ctx.input_groups() if true_sequential else [list(ctx.targets)]
        for names in groups:
            acc = {n: HessianAccumulator() for n in names}
            ctx.run({n: (lambda n, x: acc[n].add(x)) for n in names})
            for n in names:
                mod = ctx.targets[n]
                wref = linear_weight(mod)
                W = wref.detach().to(ctx.device, torch.float32)
                H = acc[n].H  # None if the forward never reached this layer: plain rounding (H = I)
                qw = quantize_layer(n, W, torch.eye(W.shape[1], device=ctx.device) if H is None else H)
                del acc[n]
                wq = dequantize_codes(qw.codes, qw.scales, qw.zeros) if propagate is None else propagate(qw, W)
                wref.data.copy_(wq.to(wref.dtype))
                home = wref.device if block_stream(model) is None else "cpu"
                own = None if not qw.slice_params else \
                    {r: (a.to(home), b.to(home)) for r, (a, b) in qw.slice_params.items()}
                out[n] = QuantizedWeight(qw.codes.to(home), qw.scales.to(home), qw.zeros.to(home), qw.bits,
                                         qw.group_size, own)

    run_blockwise(model, calib, targets, per_block, device=device, batch_size=batch_size, progress=progress,
                  desc=desc, resumable=True)
    missing = [t for t in targets if t not in out]
    if missing:
        raise RuntimeError(f"block-wise pass did not reach {missing[:3]}")
    return out
