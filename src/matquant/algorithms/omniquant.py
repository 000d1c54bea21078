"""OmniQuant + MatQuant (`--method omniquant`): block-wise calibration of learnable weight clipping (LWC) and,
optionally, a learnable equivalent transformation (LET), trained so that every sliced precision r in R of ONE int-c
master is accurate. Only one block's weights, its learnable parameters and the block's activations are worked on
at a time.

This module is the method's entry point: it validates the options and records the run's settings; the pieces are
`training.objective` (R, λ, co-distillation: the paper's notation ``[8,4,2]``, ``[8,4,8->2]``, ``[8,4,2,8->2]``,
``[8,4,2,8->4;2]``), `training.lwc` (the LWC/LET parametrisation), `training.block_loop` (the per-block loop and
its loss), `blocks` (block-input capture) and `training.workdir` (resume: rerunning the same command with the same
``work_dir`` skips finished blocks and ends with an identical result). OmniQuant's *shift* δ is not used: RMSNorm
and Llama's linears have no bias, so a shift cannot be folded into the checkpoint.
"""
from __future__ import annotations

import math

import torch

from matquant.algorithms.slice_params import DEFAULT_SLICE_PARAMS, check_post_pass, fit_slice_params
from matquant.algorithms.training.block_loop import BlockTraining, calibrate_blocks
from matquant.algorithms.training.objective import build_objective
from matquant.algorithms.training.workdir import WorkDir, tensor_sha256
from matquant.models.targets import linear_weight
from matquant.quant.clip_search import DEFAULT_CLIP, check_clip, check_clip_lambdas
from matquant.quant.minmax import QuantizedWeight
from matquant.quant.slicing import DEFAULT_SLICING, check_slicing

DEFAULT_LR = 1e-3  # MatQuant paper: AdamW, constant lr 1e-3
DEFAULT_LR_LWC = 2e-1  # OmniQuant uses 1e-2 with ~40x more steps; see docs/omniquant.md
DEFAULT_EPOCHS = 2
BLOCK_INPUTS = ("quant", "fp")
LOSS_BALANCE = ("none", "initial")


def omniquant(
    model, targets: list[str], *, master_bits: int, group_size: int, symmetric: bool, param_dtype,
    slicing: str = DEFAULT_SLICING, calib: torch.Tensor, progress: bool = True, bits_list=None, lambdas=None,
    distill: str | None = None, epochs: int = DEFAULT_EPOCHS, lr: float = DEFAULT_LR,
    lr_lwc: float | None = DEFAULT_LR_LWC, lr_let: float | None = None, weight_decay: float = 0.0, let: bool = False,
    block_inputs: str = "quant", loss_balance: str = "none", work_dir=None, seed: int = 0, device: str = "cpu",
    clip: str = DEFAULT_CLIP, clip_lambdas=None, slice_params: str = DEFAULT_SLICE_PARAMS,
    _crash_after_block: int | None = None,
) -> dict[str, QuantizedWeight]:
    """`clip`: where the learnable clipping starts: MinMax ('minmax', default, OmniQuant's), or the clipping search
    of quant/clip_search.py for the objective's R and λ, data-free ('mse') or weighted by the calibration inputs'
    mean x² ('weighted'); `clip_lambdas` (one per slice of R) replaces λ in that search only. slice_params='own':
    the served slices' own (α_r, z_r), fitted after the training on `calib` (algorithms/slice_params.py)."""
    objective = build_objective(bits_list, lambdas, distill, master_bits=master_bits, slicing=slicing)
    check_slicing(slicing)
    check_clip(clip)
    check_clip_lambdas(clip_lambdas, clip, master_bits, objective.bits)
    check_post_pass(slice_params, calib, "omniquant")
    lr_lwc = DEFAULT_LR_LWC if lr_lwc is None else lr_lwc
    if block_inputs not in BLOCK_INPUTS:
        raise ValueError(f"block_inputs must be one of {BLOCK_INPUTS}, got {block_inputs!r}.")
    if loss_balance not in LOSS_BALANCE:
        raise ValueError(f"--loss-balance must be one of {LOSS_BALANCE}, got {loss_balance!r}.")
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 0:
        raise ValueError(f"--epochs must be a non-negative integer, got {epochs!r}.")
    for name, v in (("--lr", lr), ("--lr-lwc", lr_lwc), ("--lr-let", lr_let)):
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive number, got {v!r}.")
    if not torch.is_tensor(calib) or calib.dim() != 2 or calib.shape[0] < 1:
        raise ValueError("omniquant needs calibration windows: a LongTensor [n_windows, seqlen].")
    hp = BlockTraining(master_bits=master_bits, group_size=group_size, symmetric=symmetric, param_dtype=param_dtype,
                       slicing=slicing, epochs=epochs, lr=lr, lr_lwc=lr_lwc, lr_let=lr_let,
                       weight_decay=weight_decay, let=let, block_inputs=block_inputs, loss_balance=loss_balance,
                       seed=seed, clip=clip,
                       clip_lambdas=None if clip_lambdas is None else tuple(float(x) for x in clip_lambdas))
    mods = dict(model.named_modules())
    wd = None
    if work_dir:
        settings = dict(method="omniquant", targets=list(targets), objective=objective.to_dict(),
                        **{k: v for k, v in vars(hp).items() if k != "param_dtype"
                           and not (k == "clip" and v == DEFAULT_CLIP) and not (k == "clip_lambdas" and v is None)},
                        param_dtype=str(param_dtype),
                        calib_shape=list(calib.shape), calib_sha256=tensor_sha256(calib),
                        weights_sha256=tensor_sha256(*(linear_weight(mods[t]) for t in targets)))
        wd = WorkDir(work_dir, settings)
        wd.clean_temporaries()
    for p in model.parameters():
        p.requires_grad_(False)
    if progress:
        print(f"omniquant: {len(targets)} layers; {objective.describe()}; {calib.shape[0]}×{calib.shape[1]} tokens "
              f"× {epochs} epochs; inputs={block_inputs}" + ("; LET" if let else ""), flush=True)
    importance = None
    if clip == "weighted":
        from matquant.algorithms.importance import input_importance

        importance = input_importance(model, targets, calib, progress)
    out = calibrate_blocks(model, targets, calib, objective, hp, wd, device, progress, _crash_after_block,
                           importance=importance)
    if slice_params == "own":
        return fit_slice_params(model, targets, out, calib, slicing=slicing, symmetric=symmetric,
                                param_dtype=param_dtype, progress=progress, device=device)
    return out


# CPU-friendly calibration defaults used by the CLI when --calib-windows / --calib-seqlen are not given
