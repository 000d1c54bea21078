"""The block-wise (OmniQuant-style) MatQuant calibration loop: per transformer block, in order, train the block's
LWC/LET parameters (`lwc.BlockQuant`) so that every slice r ∈ R of ONE int-c master is accurate, then fix its codes
and propagate the activation streams through the quantized block.

* Loss per calibration window: Σ_r λ_r · mean over the sources of r of MSE(teacher, F_block(S(Q(W), r), X_r)) /
  mean(y_fp²), with STE through every rounding; the teacher is the full-precision block output (``fp``) and/or,
  for co-distillation, the int-t slice's block output (stop-gradient) (`objective.Objective.sources`).
* Block inputs: ``quant`` (as OmniQuant): the slice-r student sees the output of the already-quantized previous
  blocks *at precision r* (one activation stream per r); ``fp``: every student sees the fp inputs (one stream).
* After a block is trained its final master codes are computed with ``quantize_codes`` (round-half-up) from the
  learned α, z rounded to the storage dtype first; the streams are propagated through the real quantized block.
* Resume: each finished block is one unit of the work dir (`workdir.WorkDir`); a rerun skips finished blocks
  (their outputs are recomputed by forward passes) and ends identical, because each block's randomness is seeded
  from (seed, block index).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from matquant.algorithms.blocks import (capture_block_inputs, new_results, offload_block, onload_block,
                                       targets_by_block)
from matquant.algorithms.training.diverged import check_finite_loss
from matquant.algorithms.training.lwc import BlockQuant, as_param, run_block
from matquant.algorithms.training.objective import Objective
from matquant.algorithms.training.workdir import WorkDir
from matquant.quant.minmax import QuantizedWeight, dequantize_codes
from matquant.quant.slicing import slice_master


@dataclass(frozen=True)
class BlockTraining:
    """Hyper-parameters of the block-wise training (validated by `matquant.algorithms.omniquant`)."""

    master_bits: int
    group_size: int
    symmetric: bool
    param_dtype: torch.dtype
    slicing: str
    epochs: int
    lr: float
    lr_lwc: float
    lr_let: float | None
    weight_decay: float
    let: bool
    block_inputs: str
    loss_balance: str
    seed: int
    clip: str = "minmax"  # initial LWC clipping: MinMax, or the clipping search (quant/clip_search.py)
    clip_lambdas: tuple | None = None  # the search's slice weights (None: the objective's λ)


def calibrate_blocks(model, targets: list[str], calib: torch.Tensor, objective: Objective, hp: BlockTraining,
                     work_dir: WorkDir | None, device, progress: bool = True,
                     _crash_after_block: int | None = None,
                     importance: dict | None = None) -> dict[str, QuantizedWeight]:
    """`importance`: {target name: [in] mean x²} for hp.clip == 'weighted' (`algorithms.importance`)."""
    list_name, blocks, per_block = targets_by_block(model, targets)
    dev = torch.device(device)
    hidden, block_args = capture_block_inputs(model, calib, dev, batch_size=1, cache_device=dev)
    x0 = torch.stack(hidden)  # [n_windows, 1, seq, hidden]
    quant_streams = objective.needed() if hp.block_inputs == "quant" else ()
    streams = {"fp": x0, **{r: x0.clone() for r in quant_streams}}
    result: dict[str, QuantizedWeight] = new_results(model)
    for i in range(max(per_block) + 1):
        block = onload_block(model, blocks, i, dev)
        args = block_args[i]  # per window: (positional args after the hidden states, keyword args)
        with torch.no_grad():  # fp target: the unmodified block on fp inputs (also the next fp input)
            y_fp = _through(block, {}, streams["fp"], args)
        qws = {}  # this block's quantized targets (none: its streams pass through the unmodified block)
        if i in per_block:
            rel = [t[len(f"{list_name}.{i}."):] for t in per_block[i]]
            unit = f"block_{i:03d}"
            if work_dir is not None and work_dir.has(unit):
                qws, fp = _load_block(work_dir, unit)
                print(f"block {i}: resumed from {work_dir.path}", flush=True) if progress else None
            else:
                t0 = time.time()
                imp = None if importance is None else {r: importance[f"{list_name}.{i}.{r}"] for r in rel}
                qws, fp, info = train_block(block, rel, objective, streams, y_fp, args, i, hp, progress, dev,
                                            work_dir, imp)
                info["seconds"] = round(time.time() - t0, 2)
                qws = {t: QuantizedWeight(q.codes.cpu(), q.scales.cpu(), q.zeros.cpu(), q.bits, q.group_size)
                       for t, q in qws.items()}
                fp = {k: v.cpu() for k, v in fp.items()}
                if work_dir is not None:
                    _save_block(work_dir, unit, qws, fp, info)
            with torch.no_grad():  # apply: LET-modified fp tensors into the model
                for k, v in fp.items():
                    p = block.get_parameter(k)
                    p.copy_(v.to(p.dtype))
            for t, q in qws.items():
                result[f"{list_name}.{i}.{t}"] = q
        with torch.no_grad():  # each quantized stream through the real quantized block at its precision
            for r in quant_streams:
                params = {f"{t}.weight": as_param(block, t, dequantize_codes(
                    slice_master(q.codes.to(dev), q.bits, r, hp.slicing), q.scales.to(dev), q.zeros.to(dev)))
                    for t, q in qws.items()}
                streams[r] = _through(block, params, streams[r], args)
        streams["fp"] = y_fp
        offload_block(model, blocks, i, "cpu")
        if _crash_after_block is not None and i == _crash_after_block:
            raise RuntimeError(f"simulated crash after block {i}")
    return result


def _through(block, params: dict, xs: torch.Tensor, args) -> torch.Tensor:
    """The block's output for every window of one activation stream xs [n_windows, ...]."""
    return torch.stack([run_block(block, params, x, *args[j]) for j, x in enumerate(xs)])


def train_block(block, rel_targets, objective: Objective, streams, y_fp, args, idx, hp: BlockTraining, progress,
                dev, work_dir: WorkDir | None = None, importance: dict | None = None):
    """Train one block's LWC (and LET) parameters; returns ({rel target: QuantizedWeight}, {fp tensors}, info)."""
    torch.manual_seed(hp.seed * 100003 + idx)
    clip = None if hp.clip == "minmax" else dict(
        slices=objective.bits, lambdas=hp.clip_lambdas or objective.lambdas, slicing=hp.slicing,
        param_dtype=hp.param_dtype, importance=importance)
    bq = BlockQuant(block, rel_targets, hp.master_bits, hp.group_size, hp.symmetric, hp.let,
                    block_x=(streams["fp"], args) if hp.let else None, clip=clip).to(dev)
    groups = [{"params": list(bq.up.values()) + list(bq.low.values()), "lr": hp.lr_lwc}]
    if hp.let:
        groups.append({"params": list(bq.let_scales), "lr": hp.lr_let or hp.lr})
    opt = torch.optim.AdamW(groups, lr=hp.lr, weight_decay=hp.weight_decay, eps=1e-12)
    n = y_fp.shape[0]
    # MSE relative to the block output's mean square: same optimum, but the loss is O(1) whatever the activation
    # scale, so AdamW's eps never swamps the (tiny) gradients of small or randomly initialised models
    norm = y_fp.float().pow(2).mean().clamp_min(1e-30)
    gen = torch.Generator().manual_seed(hp.seed * 100003 + idx)
    needed = objective.needed()
    students = objective.students
    teacher_bits = set(objective.teachers)
    epoch_means = []

    def slice_losses(j):
        """(r, unweighted loss) for each student r on window j: relative MSE to its sources, averaged. A generator,
        so a backward on one slice's loss frees its graph before the next slice is computed."""
        outs = {}
        for r in needed:  # descending: int-t teachers are computed before their students
            x = streams[r][j] if r in streams else streams["fp"][j]
            if r not in students:
                with torch.no_grad():
                    outs[r] = run_block(block, bq.fake_params(r, hp.slicing), x, *args[j])
                continue
            y = run_block(block, bq.fake_params(r, hp.slicing), x, *args[j])
            if r in teacher_bits:
                outs[r] = y.detach()
            ts = objective.sources(r)
            yield r, sum(F.mse_loss(y, y_fp[j] if t == "fp" else outs[t]) for t in ts) / len(ts) / norm

    lam = {t.bits: t.weight for t in objective.terms}
    # loss balance: 'none' = the paper's Σ λ_r·loss_r; 'initial' divides each loss_r by its value at the starting
    # (MinMax) clipping, so λ_r weights relative improvement and the large int2 error does not drown int8's
    base = {r: 1.0 for r in students}
    if hp.loss_balance == "initial" and hp.epochs > 0:
        sums = {r: 0.0 for r in students}
        with torch.no_grad():
            for j in range(n):
                for r, v in slice_losses(j):
                    sums[r] += v.item()
        base = {r: max(sums[r] / n, 1e-12) for r in students}
    kept = (f"Blocks finished before block {idx} are kept in {work_dir.path}." if work_dir is not None
            else "Nothing was kept (no --work-dir).")
    bar = tqdm(total=hp.epochs * n, desc=f"block {idx}", disable=not progress, leave=False)
    for ep in range(hp.epochs):
        tot = 0.0
        for j in torch.randperm(n, generator=gen).tolist():
            opt.zero_grad(set_to_none=True)
            step = 0.0
            for r, loss in slice_losses(j):
                loss = lam[r] * loss / base[r]
                check_finite_loss(loss.item(), f"block {idx}, epoch {ep}, int{r}", kept,
                                  f"a lower --lr-lwc (now {hp.lr_lwc:g}; e.g. {hp.lr_lwc / 4:g})"
                                  + (f" or --lr-let (now {hp.lr_let or hp.lr:g})" if hp.let else ""))
                loss.backward()
                step += loss.item()
            opt.step()
            tot += step
            bar.update(1)
            bar.set_postfix(loss=f"{step:.3g}")
        epoch_means.append(tot / max(n, 1))
    bar.close()
    first, last = (epoch_means[0], epoch_means[-1]) if epoch_means else (None, None)
    qws, fp = bq.finalize(hp.param_dtype)
    if progress:
        tqdm.write(f"block {idx}: loss {first if first is not None else float('nan'):.4g} -> "
                   f"{last if last is not None else float('nan'):.4g}")
    return qws, fp, {"first_epoch_loss": first, "last_epoch_loss": last}


def _save_block(wd: WorkDir, unit: str, qws: dict, fp: dict, info: dict) -> None:
    tensors, meta = {}, {}
    for t, q in qws.items():
        tensors[f"q/{t}/codes"], tensors[f"q/{t}/scales"], tensors[f"q/{t}/zeros"] = q.codes, q.scales, q.zeros
        meta[t] = [q.bits, q.group_size]
    for k, v in fp.items():
        tensors[f"fp/{k}"] = v
    wd.save(unit, tensors, {"q": meta, "info": info})


def _load_block(wd: WorkDir, unit: str) -> tuple[dict, dict]:
    tensors, meta = wd.load(unit)
    qws = {t: QuantizedWeight(tensors[f"q/{t}/codes"], tensors[f"q/{t}/scales"], tensors[f"q/{t}/zeros"], b, gs)
           for t, (b, gs) in meta["q"].items()}
    fp = {k[3:]: v for k, v in tensors.items() if k.startswith("fp/")}
    return qws, fp
