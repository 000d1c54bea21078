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

from matquant.algorithms.slice_params import check_post_pass, fit_slice_params
from matquant.algorithms.training.block_loop import BlockTraining, calibrate_blocks
from matquant.algorithms.training.objective import build_objective
from matquant.algorithms.training.workdir import WorkDir, tensor_sha256
from matquant.models.targets import linear_weight
from matquant.quant.clip_search import DEFAULT_CLIP
from matquant.quant.minmax import QuantizedWeight

DEFAULT_LR = 1e-3  # MatQuant paper: AdamW, constant lr 1e-3
DEFAULT_LR_LWC = 2e-1  # OmniQuant uses 1e-2 with ~40x more steps; see docs/omniquant.md
DEFAULT_EPOCHS = 2
BLOCK_INPUTS = ("quant", "fp")
LOSS_BALANCE = ("none", "initial")


def check_options(c) -> None:
    """OmniQuant's own option checks (OmniQuantConfig.validate)."""
    if c.block_inputs not in BLOCK_INPUTS:
        raise ValueError(f"block_inputs must be one of {BLOCK_INPUTS}, got {c.block_inputs!r}.")
    if c.loss_balance not in LOSS_BALANCE:
        raise ValueError(f"--loss-balance must be one of {LOSS_BALANCE}, got {c.loss_balance!r}.")
    if not isinstance(c.epochs, int) or isinstance(c.epochs, bool) or c.epochs < 0:
        raise ValueError(f"--epochs must be a non-negative integer, got {c.epochs!r}.")
    for name, v in (("--lr", c.lr), ("--lr-lwc", c.lr_lwc), ("--lr-let", c.lr_let)):
        if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive number, got {v!r}.")


def omniquant(model, targets: list[str], config, calib: torch.Tensor, progress: bool = True,
              _crash_after_block: int | None = None) -> dict[str, QuantizedWeight]:
    """Block-wise MatQuant training of learnable clipping (an OmniQuantConfig). `clip`: where the clipping starts
    (MinMax, or the clipping search for the objective's R and λ; `clip_lambdas` replaces λ in that search only);
    slice_params='own': the served slices' own (α_r, z_r), fitted after the training on `calib`."""
    c, param_dtype = config, config.torch_param_dtype
    objective = build_objective(c.bits_list, c.lambdas, c.distill, master_bits=c.master_bits, slicing=c.slicing)
    check_post_pass(c.slice_params, calib, "omniquant")
    if not torch.is_tensor(calib) or calib.dim() != 2 or calib.shape[0] < 1:
        raise ValueError("omniquant needs calibration windows: a LongTensor [n_windows, seqlen].")
    hp = BlockTraining(master_bits=c.master_bits, group_size=c.group_size, symmetric=c.symmetric,
                       param_dtype=param_dtype, slicing=c.slicing, epochs=c.epochs, lr=c.lr,
                       lr_lwc=DEFAULT_LR_LWC if c.lr_lwc is None else c.lr_lwc, lr_let=c.lr_let,
                       weight_decay=c.weight_decay, let=c.let, block_inputs=c.block_inputs,
                       loss_balance=c.loss_balance, seed=c.seed, clip=c.clip,
                       clip_lambdas=None if c.clip_lambdas is None else tuple(float(x) for x in c.clip_lambdas))
    mods = dict(model.named_modules())
    wd = None
    if c.work_dir:
        settings = dict(method="omniquant", targets=list(targets), objective=objective.to_dict(),
                        **{k: v for k, v in vars(hp).items() if k != "param_dtype"
                           and not (k == "clip" and v == DEFAULT_CLIP) and not (k == "clip_lambdas" and v is None)},
                        param_dtype=str(param_dtype),
                        calib_shape=list(calib.shape), calib_sha256=tensor_sha256(calib),
                        weights_sha256=tensor_sha256(*(linear_weight(mods[t]) for t in targets)))
        wd = WorkDir(c.work_dir, settings)
        wd.clean_temporaries()
    for p in model.parameters():
        p.requires_grad_(False)
    if progress:
        print(f"omniquant: {len(targets)} layers; {objective.describe()}; {calib.shape[0]}×{calib.shape[1]} tokens "
              f"× {c.epochs} epochs; inputs={c.block_inputs}" + ("; LET" if c.let else ""), flush=True)
    importance = None
    if c.clip == "weighted":
        from matquant.algorithms.importance import input_importance

        importance = input_importance(model, targets, calib, progress)
    out = calibrate_blocks(model, targets, calib, objective, hp, wd, c.device, progress, _crash_after_block,
                           importance=importance)
    if c.slice_params == "own":
        return fit_slice_params(model, targets, out, calib, slicing=c.slicing, symmetric=c.symmetric,
                                param_dtype=param_dtype, progress=progress, device=c.device)
    return out


# CPU-friendly calibration defaults used by the CLI when --calib-windows / --calib-seqlen are not given
