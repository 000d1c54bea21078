"""Per-input-column importance of target linears from calibration activations: h_j = mean over tokens of x_j²
(∝ diag(XᵀX), the diagonal GPTQ's Hessian 2XᵀX/N has), from one no-grad forward of the (unquantized) model.

Used by `clip='weighted'` (quant/clip_search.py) for the methods that do not build a Hessian themselves (RTN,
OmniQuant, QAT). The hooks see a target's input as the module does, after any forward pre-hook registered before
them (e.g. an input rotation).
"""
from __future__ import annotations

import torch
from tqdm.auto import tqdm

from matquant.algorithms.blocks import block_stream, run_blockwise


@torch.no_grad()
def input_importance(model, targets: list[str], calib: torch.Tensor, progress: bool = True,
                     what: str = "clip='weighted'") -> dict[str, torch.Tensor]:
    """{target name: float32 [in_features] mean of x²} over every token of the windows `calib` ([n, seqlen])."""
    if not torch.is_tensor(calib) or calib.dim() != 2 or calib.shape[0] < 1:
        raise ValueError(f"{what} needs calibration token windows (a LongTensor [n_windows, seqlen]); pass calib=..., "
                         "or on the command line --calib-text / --calib-windows; or use clip='mse' (data-free).")
    if block_stream(model) is not None:
        return _blockwise_importance(model, targets, calib, progress)
    mods = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name):
        def fn(_m, inp):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
            sums[name] = sums.get(name, 0) + x.pow(2).sum(0).cpu()
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in targets]
    device = next(model.parameters()).device
    try:
        for i in tqdm(range(calib.shape[0]), desc="importance", disable=not progress, leave=False):
            model(calib[i:i + 1].to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in targets if n not in sums]
    if missing:
        raise RuntimeError(f"the calibration forward never reached {missing[:3]}: cannot weight their clipping.")
    return {n: sums[n] / counts[n] for n in targets}


def _blockwise_importance(model, targets: list[str], calib: torch.Tensor, progress: bool) -> dict[str, torch.Tensor]:
    """`input_importance` one block at a time (a streamed model): the same windows through the unquantized blocks,
    one window per batch as the whole-model forward above, so the sums are accumulated in the same order."""
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def observe(name, x):
        x = x.reshape(-1, x.shape[-1]).float()
        sums[name] = sums.get(name, 0) + x.pow(2).sum(0).cpu()
        counts[name] = counts.get(name, 0) + x.shape[0]

    def per_block(ctx):
        ctx.outputs = ctx.run({n: observe for n in ctx.targets}, keep_outputs=True)

    run_blockwise(model, calib, targets, per_block, device="cpu", batch_size=1, progress=progress, desc="importance")
    missing = [n for n in targets if n not in sums]
    if missing:
        raise RuntimeError(f"the calibration forward never reached {missing[:3]}: cannot weight their clipping.")
    return {n: sums[n] / counts[n] for n in targets}
