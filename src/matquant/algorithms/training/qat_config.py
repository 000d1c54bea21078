"""QAT hyper-parameters (`TrainingConfig`, validated before any work), the learning-rate schedule, the data order and the
per-step RNG seed: pure functions of (seed, step), so a resumed run needs no loader or RNG state."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from matquant.algorithms.training.fake_quant import QPARAM_MODES


@dataclass
class TrainingConfig:
    steps: int = 200
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int | None = None  # default: 5% of steps (at least 1)
    min_lr_ratio: float = 0.1
    batch_size: int = 1  # windows per micro-batch per process
    grad_accum: int = 1
    max_grad_norm: float = 1.0  # 0 disables clipping
    qparams: str = "minmax"
    seed: int = 0
    save_every: int = 50  # 0: only the final checkpoint
    work_dir: str | None = None  # None: no checkpoints (no resume)
    device: str = "auto"  # auto: cuda (this rank's GPU) if available, else cpu
    amp: bool = True  # bf16 autocast on CUDA; ignored on CPU
    global_batch: int | None = None  # windows per optimizer step over all processes (replaces batch_size)
    shard: str | None = None  # under torchrun: ddp or fsdp (None: distributed.DEFAULT_SHARD)
    activation_checkpointing: bool = False  # recompute each decoder block's activations in backward
    extra: dict = field(default_factory=dict)

    def validate(self) -> "TrainingConfig":
        def need(ok, msg):
            if not ok:
                raise ValueError(msg)

        need(isinstance(self.steps, int) and self.steps >= 1, f"--steps must be a positive integer, got {self.steps!r}.")
        need(math.isfinite(self.lr) and self.lr > 0, f"--lr must be a positive number, got {self.lr!r}.")
        need(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay!r}.")
        need(isinstance(self.batch_size, int) and self.batch_size >= 1,
             f"--batch-size-train must be a positive integer, got {self.batch_size!r}.")
        need(isinstance(self.grad_accum, int) and self.grad_accum >= 1,
             f"--grad-accum must be a positive integer, got {self.grad_accum!r}.")
        need(self.save_every >= 0, f"--save-every must be >= 0, got {self.save_every!r}.")
        need(0 <= self.min_lr_ratio <= 1, f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio!r}.")
        need(self.max_grad_norm >= 0, f"--max-grad-norm must be >= 0, got {self.max_grad_norm!r}.")
        need(self.qparams in QPARAM_MODES, f"--qparams must be one of {', '.join(QPARAM_MODES)}, got {self.qparams!r}.")
        need(self.global_batch is None or (isinstance(self.global_batch, int) and self.global_batch >= 1),
             f"--global-batch must be a positive integer, got {self.global_batch!r}.")
        need(self.global_batch is None or self.batch_size == 1,
             "give --global-batch or --batch-size-train, not both (--global-batch sets the per-process batch).")
        if self.warmup_steps is None:
            self.warmup_steps = max(1, self.steps // 20)
        need(0 <= self.warmup_steps <= self.steps,
             f"--warmup-steps must be in 0..steps ({self.steps}), got {self.warmup_steps!r}.")
        return self


def per_process_batch(cfg: TrainingConfig, world: int) -> int:
    """Windows per micro-batch per process: --batch-size-train, or --global-batch / (world × --grad-accum)."""
    if cfg.global_batch is None:
        return cfg.batch_size
    split = world * cfg.grad_accum
    if cfg.global_batch % split:
        raise ValueError(f"--global-batch {cfg.global_batch} is not divisible by {world} process(es) x --grad-accum "
                         f"{cfg.grad_accum} = {split}; use a multiple of {split} (e.g. "
                         f"{max(split, cfg.global_batch // split * split)}).")
    return cfg.global_batch // split


def lr_at(cfg: TrainingConfig, step: int) -> float:
    """Learning rate of update `step` (0-based): linear warm-up, then cosine to min_lr_ratio·lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + (cfg.lr - lo) * 0.5 * (1.0 + math.cos(math.pi * progress))


def sample_indices(n: int, seed: int, start: int, count: int) -> list[int]:
    """Window indices of global samples start..start+count-1: a seeded permutation per epoch."""
    out, cache = [], {}
    for i in range(start, start + count):
        epoch, pos = divmod(i, n)
        if epoch not in cache:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            cache[epoch] = torch.randperm(n, generator=g)
        out.append(int(cache[epoch][pos]))
    return out


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + rank * 104_729) % (2**63 - 1)


def make_config(**kw) -> TrainingConfig:
    """A validated TrainingConfig from option names as the CLI / `quantize_model` spell them (None = the default)."""
    cfg = TrainingConfig()
    mapping = {"batch_size_train": "batch_size"}
    for k, v in kw.items():
        if v is None and k != "work_dir":
            continue
        setattr(cfg, mapping.get(k, k), v)
    return cfg.validate()
