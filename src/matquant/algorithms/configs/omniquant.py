"""OmniQuantConfig: block-wise MatQuant training of the clipping (and optionally LET) on calibration windows."""
from __future__ import annotations

from dataclasses import dataclass

from matquant.algorithms.configs import options
from matquant.algorithms.configs.base import RUNTIME, MethodConfig, option, register_config
from matquant.algorithms.omniquant import BLOCK_INPUTS, DEFAULT_EPOCHS, DEFAULT_LR, DEFAULT_LR_LWC, LOSS_BALANCE


@register_config
@dataclass
class OmniQuantConfig(MethodConfig):
    name = "omniquant"
    summary = "block-wise MatQuant training of learnable clipping (docs/omniquant.md)"
    function = "matquant.algorithms.omniquant:omniquant"
    calib_defaults = (8, 256)

    bits_list: list | None = options.bits_list("8,4,2, as in the paper")
    lambdas: list | None = options.lambdas("0.1,0.1,1 for 8,4,2 (the paper's), else 1 for the lowest and 0.1 for "
                                           "the others")
    distill: str | None = options.distill()
    epochs: int = option(DEFAULT_EPOCHS, "passes over the calibration windows per block", type=int)
    lr: float = option(DEFAULT_LR, "AdamW learning rate (constant)", type=float)
    lr_lwc: float | None = option(DEFAULT_LR_LWC, "learning rate of the clipping logits (docs/omniquant.md)",
                                  type=float)
    lr_let: float | None = option(None, "learning rate of the LET scales (default --lr)", type=float)
    weight_decay: float = option(0.0, "AdamW weight decay", type=float)
    let: bool = option(False, "also learn the equivalent transformation (Llama-style blocks: norm -> gate/up, "
                       "up -> down)", action="store_true")
    block_inputs: str = option("quant", "quant: each slice sees the quantized previous blocks' output at its "
                               "precision (OmniQuant); fp: every slice sees the full-precision inputs",
                               choices=BLOCK_INPUTS)
    loss_balance: str = option("none", "none: the paper's sum of lambda_r * loss_r; initial: each loss_r divided by "
                               "its value at the starting clipping, so lambda weights relative improvement "
                               "(a deviation; docs/omniquant.md)", choices=LOSS_BALANCE)
    work_dir: str | None = options.work_dir("finished blocks; rerunning the same command resumes from here")
    seed: int = options.seed(0)
    device: str = option("cpu", "device of the block-wise training", kind=RUNTIME, cli=False)
    clip: str = options.clip(": the learnable clipping's start")
    clip_lambdas: list | None = options.clip_lambdas("--bits-list precision; the search is the start of the "
                                                     "learnable clipping")
    slice_params: str = options.slice_params()

    def validate_method(self) -> None:
        from matquant.algorithms.omniquant import check_options

        super().validate_method()
        self.validate_objective()
        check_options(self)
        if self.let and self.rotate in ("input", "block"):
            raise ValueError("LET (--let) folds per-channel scales into the RMSNorm/up_proj that feed the rotated "
                             "layers, which an input rotation does not commute with; use --rotate none with --let, "
                             "or drop --let.")
