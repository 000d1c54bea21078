"""QAT + MatQuant (`--method qat`): end-to-end training of the target linear weights with

    Σ_r λ_r · L_r(model whose targets are fake-quantized to the r-bit slice of the int-c master)

This module is the method's entry point: it validates the options and runs the loop. The pieces are
`training.objective` (R, λ, co-distillation), `training.qat_config` (hyper-parameters, schedule, data order),
`training.fake_quant` (the fake-quantized layers), `training.qat_loop` (the loop, checkpoints), `training.workdir`
(resume) and `training.distributed` (torchrun).
"""
from __future__ import annotations

import torch

from matquant.algorithms.slice_params import DEFAULT_SLICE_PARAMS, check_post_pass, fit_slice_params
from matquant.algorithms.training.distributed import init_distributed, is_main_process, pick_device
from matquant.algorithms.training.objective import build_objective
from matquant.algorithms.training.qat_config import make_config
from matquant.algorithms.training.qat_loop import train_qat
from matquant.quant.clip_search import DEFAULT_CLIP, check_clip, check_clip_lambdas
from matquant.quant.minmax import QuantizedWeight
from matquant.quant.slicing import DEFAULT_SLICING


def qat(model, targets: list[str], *, master_bits: int, group_size: int, symmetric: bool, param_dtype,
        slicing: str = DEFAULT_SLICING, calib: torch.Tensor, progress: bool = True, bits_list=None, lambdas=None,
        distill: str | None = None, steps: int | None = None, lr: float | None = None,
        weight_decay: float | None = None, warmup_steps: int | None = None, min_lr_ratio: float | None = None,
        batch_size_train: int | None = None, grad_accum: int | None = None, max_grad_norm: float | None = None,
        qparams: str | None = None, seed: int | None = None, save_every: int | None = None, work_dir=None,
        device: str | None = None, amp: bool | None = None, step_callback=None,
        clip: str = DEFAULT_CLIP, clip_lambdas=None,
        slice_params: str = DEFAULT_SLICE_PARAMS) -> dict[str, QuantizedWeight]:
    """`quantize_model(model, "qat", calib=windows, bits_list=..., lambdas=..., distill=..., steps=..., ...)`;
    None means the TrainingConfig default. `clip` ('mse' / 'weighted', needs qparams='learnable'): the learnable α, z
    start at the clipping search of quant/clip_search.py for the objective's R and λ instead of MinMax;
    `clip_lambdas` (one per slice of R) replaces λ in that search only (the training keeps `lambdas`).
    slice_params='own': the served slices' own (α_r, z_r), fitted after the training on `calib` to the original
    weights (algorithms/slice_params.py)."""
    objective = build_objective(bits_list, lambdas, distill, master_bits=master_bits, slicing=slicing)
    check_clip(clip)
    check_clip_lambdas(clip_lambdas, clip, master_bits, objective.bits)
    check_post_pass(slice_params, calib, "qat")
    cfg = make_config(steps=steps, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                      min_lr_ratio=min_lr_ratio, batch_size_train=batch_size_train, grad_accum=grad_accum,
                      max_grad_norm=max_grad_norm, qparams=qparams, seed=seed, save_every=save_every,
                      work_dir=work_dir, device=device, amp=amp)
    if clip != "minmax" and cfg.qparams != "learnable":
        raise ValueError(f"qat with clip={clip!r} needs qparams='learnable' (--qparams learnable): with MinMax "
                         "qparams α and z are recomputed from the weights at every step, so a searched start "
                         "would be discarded.")
    importance = None
    if clip == "weighted":
        from matquant.algorithms.importance import input_importance

        importance = input_importance(model, targets, calib, progress)
    res = train_qat(model, targets, calib, objective, cfg, group_size=group_size, symmetric=symmetric,
                    param_dtype=param_dtype, progress=progress, step_callback=step_callback, clip=clip,
                    importance=importance, clip_lambdas=None if clip_lambdas is None else tuple(map(float, clip_lambdas)))
    if progress and is_main_process():
        run_tokens = (res.steps - res.resumed_from) * res.tokens // res.steps
        tps = run_tokens / max(res.seconds, 1e-9)
        print(f"QAT {objective.describe()}: {res.steps} steps, {res.tokens} tokens, "
              f"final loss {res.history[-1]['loss']:.4f}, {tps:.1f} tokens/s this run")
    if slice_params == "own":
        return fit_slice_params(model, targets, res.qweights, calib, slicing=slicing, symmetric=symmetric,
                                param_dtype=param_dtype, progress=progress and is_main_process(),
                                device=pick_device(cfg.device, init_distributed(cfg.device)))
    return res.qweights
