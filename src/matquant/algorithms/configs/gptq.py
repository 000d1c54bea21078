"""GPTQConfig: GPTQ at the master precision (the per-bit baseline); MatGPTQConfig extends it."""
from __future__ import annotations

from dataclasses import dataclass

from matquant.algorithms.configs import options
from matquant.algorithms.configs.base import RUNTIME, MethodConfig, option, register_config
from matquant.algorithms.gptq import DEFAULT_BLOCKSIZE


@register_config
@dataclass
class GPTQConfig(MethodConfig):
    name = "gptq"
    summary = "GPTQ at --bits-master bits (the per-bit baseline)"
    function = "matquant.algorithms.gptq:gptq"

    damp: float = option(0.01, "Hessian damping, as a fraction of its mean diagonal", type=float)
    act_order: bool = option(False, "process columns by decreasing Hessian diagonal (group parameters then fixed "
                             "up front)", action="store_true")
    blocksize: int = option(DEFAULT_BLOCKSIZE, "columns per lazy-update block", cli=False)
    true_sequential: bool = option(True, "quantize the layers of a block one after another", cli=False)
    device: str | None = option(None, "device for the block-by-block pass (default: cuda if available, else cpu); "
                                "one block at a time is moved there", kind=RUNTIME, flag="--quant-device",
                                metavar="DEV")
    batch_size: int = option(1, "calibration windows per block forward", flag="--calib-batch-size", type=int)
    clip: str = options.clip()
    refit: bool = option(False, "after the column loop, re-solve every group's scale/zero for its final codes by "
                         "least squares on the calibration output error of every served slice (docs/results.md, "
                         "'Refit')", action="store_true")
    clip_lambdas: list | None = options.clip_lambdas("served slice, the master and 6,4,3,2 below it (e.g. 1,0,0 at "
                                                     "--bits-master 4: the search for int4 alone)")
    slice_params: str = options.slice_params()
    zero_points: str = options.zero_points()

    def validate_method(self) -> None:
        from matquant.algorithms.gptq import check_gptq_clip_lambdas
        from matquant.algorithms.slice_params import check_zero_points

        super().validate_method()
        check_gptq_clip_lambdas(self.clip_lambdas, self.clip, self.master_bits)
        check_zero_points(self.zero_points, symmetric=self.symmetric, param_dtype=self.param_dtype,
                          master_bits=self.master_bits, slicing=self.slicing)
