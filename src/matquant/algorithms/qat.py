"""QAT + MatQuant (`--method qat`): end-to-end training of the target linear weights with

    Σ_r λ_r · L_r(model whose targets are fake-quantized to the r-bit slice of the int-c master)

This module is the method's entry point: it validates the options and runs the loop. The pieces are
`training.objective` (R, λ, co-distillation), `training.qat_config` (hyper-parameters, schedule, data order),
`training.fake_quant` (the fake-quantized layers), `training.qat_loop` (the loop, checkpoints), `training.workdir`
(resume) and `training.distributed` (torchrun).
"""
from __future__ import annotations

import torch

from matquant.algorithms.slice_params import check_post_pass, fit_slice_params
from matquant.algorithms.training.distributed import (check_shard, init_distributed, is_main_process, pick_device,
                                                      planned_world_size)
from matquant.algorithms.training.objective import build_objective
from matquant.algorithms.training.qat_config import TrainingConfig, make_config, per_process_batch
from matquant.algorithms.training.qat_loop import train_qat
from matquant.quant.minmax import QuantizedWeight


def training_config(c) -> TrainingConfig:
    """The validated training hyper-parameters of a QATConfig (None = the TrainingConfig default)."""
    cfg = make_config(steps=c.steps, lr=c.lr, weight_decay=c.weight_decay, warmup_steps=c.warmup_steps,
                      min_lr_ratio=c.min_lr_ratio, batch_size_train=c.batch_size_train, grad_accum=c.grad_accum,
                      max_grad_norm=c.max_grad_norm, qparams=c.qparams, seed=c.seed, save_every=c.save_every,
                      work_dir=c.work_dir, device=c.device, amp=c.amp, global_batch=c.global_batch, shard=c.shard,
                      activation_checkpointing=c.activation_checkpointing)
    world = planned_world_size()  # (torchrun's, before any work: --shard fsdp alone, a batch it cannot split)
    check_shard(cfg.shard, world)
    per_process_batch(cfg, world)
    if c.clip != "minmax" and cfg.qparams != "learnable":
        raise ValueError(f"qat with clip={c.clip!r} needs qparams='learnable' (--qparams learnable): with MinMax "
                         "qparams α and z are recomputed from the weights at every step, so a searched start "
                         "would be discarded.")
    return cfg


def qat(model, targets: list[str], config, calib: torch.Tensor, progress: bool = True,
        step_callback=None) -> dict[str, QuantizedWeight]:
    """QAT with the MatQuant objective (a QATConfig). `clip` ('mse' / 'weighted', needs qparams='learnable'): the
    learnable α, z start at the clipping search for the objective's R and λ (`clip_lambdas` replaces λ there only);
    slice_params='own': the served slices' own (α_r, z_r), fitted after the training on `calib`."""
    c, param_dtype = config, config.torch_param_dtype
    objective = build_objective(c.bits_list, c.lambdas, c.distill, master_bits=c.master_bits, slicing=c.slicing)
    check_post_pass(c.slice_params, calib, "qat")
    cfg = training_config(c)
    importance = None
    if c.clip == "weighted":
        from matquant.algorithms.importance import input_importance

        importance = input_importance(model, targets, calib, progress)
    res = train_qat(model, targets, calib, objective, cfg, group_size=c.group_size, symmetric=c.symmetric,
                    param_dtype=param_dtype, progress=progress, step_callback=step_callback, clip=c.clip,
                    importance=importance,
                    clip_lambdas=None if c.clip_lambdas is None else tuple(map(float, c.clip_lambdas)),
                    keep_weights=False)
    if progress and is_main_process():
        run_tokens = (res.steps - res.resumed_from) * res.tokens // res.steps
        tps = run_tokens / max(res.seconds, 1e-9)
        print(f"QAT {objective.describe()}: {res.steps} steps, {res.tokens} tokens, "
              f"final loss {res.history[-1]['loss']:.4f}, {tps:.1f} tokens/s this run")
    if c.slice_params == "own":
        return fit_slice_params(model, targets, res.qweights, calib, slicing=c.slicing, symmetric=c.symmetric,
                                param_dtype=param_dtype, progress=progress and is_main_process(),
                                device=pick_device(cfg.device, init_distributed(cfg.device)))
    return res.qweights
