"""QATConfig: end-to-end MatQuant quantization-aware training (optionally with co-distillation), torchrun-ready."""
from __future__ import annotations

from dataclasses import dataclass

from matquant.algorithms.configs import options
from matquant.algorithms.configs.base import PIPELINE, RUNTIME, MethodConfig, option, register_config


@register_config
@dataclass
class QATConfig(MethodConfig):
    name = "qat"
    summary = "end-to-end MatQuant QAT with optional co-distillation (docs/qat.md)"
    function = "matquant.algorithms.qat:qat"

    bits_list: list | None = options.bits_list("8,4,2, as in the paper")
    lambdas: list | None = options.lambdas("0.1,0.1,1 for 8,4,2 (the paper's), else 1 for the lowest and 0.1 for "
                                           "the others")
    distill: str | None = options.distill()
    steps: int | None = option(None, "optimizer steps (default 200)", type=int)
    lr: float | None = option(None, "AdamW peak learning rate (default 1e-4)", type=float)
    weight_decay: float | None = option(None, "AdamW weight decay (default 0)", type=float)
    warmup_steps: int | None = option(None, "linear warm-up steps, then cosine (default 5%%)", type=int)
    min_lr_ratio: float | None = option(None, "final lr / peak lr of the cosine (default 0.1)", type=float)
    batch_size_train: int | None = option(None, "windows per micro-batch per process (default 1)", type=int)
    grad_accum: int | None = option(None, "micro-batches per optimizer step (default 1)", type=int)
    global_batch: int | None = option(None, "windows per optimizer step over all processes, instead of "
                                      "--batch-size-train: the same training whatever the number of processes "
                                      "(a multiple of processes x --grad-accum)", type=int)
    max_grad_norm: float | None = option(None, "gradient clipping norm, 0 = off (default 1)", type=float)
    qparams: str | None = option(None, "minmax: scale/zero recomputed from the weights every step (default); "
                                 "learnable: trained too", choices=("minmax", "learnable"))
    seed: int | None = options.seed(None)
    save_every: int | None = option(None, "checkpoint every N steps; 0 = only at the end (default 50)", type=int,
                                    kind=RUNTIME)
    work_dir: str | None = options.work_dir("training checkpoints; rerunning the same command resumes from here "
                                            "(default OUT.qat-work, deleted after a successful run unless "
                                            "--keep-work-dir; a folder you name is always kept)")
    keep_work_dir: bool = option(False, "keep the default training-state folder (OUT.qat-work: weights + AdamW "
                                 "moments) after success", kind=PIPELINE, action="store_true")
    device: str | None = option(None, "auto (default: this process's GPU if any), cpu or cuda", kind=RUNTIME,
                                flag="--train-device")
    amp: bool | None = option(None, "no bf16 autocast on GPU", kind=RUNTIME, flag="--no-amp", action="store_false")
    shard: str | None = option(None, "under torchrun: ddp (every process holds the whole model; the default) or "
                               "fsdp (FSDP2: weights, gradients and optimizer state split across the processes, "
                               "one decoder block gathered at a time, for a model too large for one device). "
                               "docs/qat.md 'Sharding'", kind=RUNTIME, choices=("ddp", "fsdp"))
    activation_checkpointing: bool = option(False, "recompute each decoder block's activations in backward instead "
                                            "of keeping them (less memory, one more forward per step)",
                                            kind=RUNTIME, action="store_true")
    clip: str = options.clip(": the learnable scale/zero's start (needs --qparams learnable)")
    clip_lambdas: list | None = options.clip_lambdas("--bits-list precision; the search is the start of the "
                                                     "learnable scale/zero")
    slice_params: str = options.slice_params()

    def validate_method(self) -> None:
        from matquant.algorithms.qat import training_config

        super().validate_method()
        self.validate_objective()
        training_config(self)

    def for_output(self, out) -> "QATConfig":
        """The training state goes next to the output folder unless a work dir is named."""
        return self if self.work_dir is not None or out is None else self.replace(work_dir=f"{out}.qat-work")
