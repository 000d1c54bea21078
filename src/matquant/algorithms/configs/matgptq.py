"""MatGPTQConfig: multi-precision GPTQ, one pass whose int-C codes are chosen for every slice of R."""
from __future__ import annotations

from dataclasses import dataclass

from matquant.algorithms.configs import options
from matquant.algorithms.configs.base import option, register_config
from matquant.algorithms.configs.gptq import GPTQConfig
from matquant.algorithms.matgptq import DEFAULT_GROUP_PARAMS, GROUP_PARAMS
from matquant.algorithms.multislice_codes import DEFAULT_ERROR_FEEDBACK, ERROR_FEEDBACK


@register_config
@dataclass
class MatGPTQConfig(GPTQConfig):
    name = "matgptq"
    summary = "multi-precision GPTQ whose int-C codes are chosen for every slice in --bits-list"
    function = "matquant.algorithms.matgptq:matgptq"

    bits_list: list | None = options.bits_list("8,4,3,2, cut to the master precision; docs/gptq.md")
    lambdas: list | None = options.lambdas("16,4,2,1 for 8,4,3,2 and 16,4,1 for 8,4,2, else all 1; docs/gptq.md")
    error_feedback: str = option(DEFAULT_ERROR_FEEDBACK, "residual propagated to later columns: the lambda-weighted "
                                 "mean over the slices (weighted), their plain mean (mean), or the int-C residual "
                                 "only (master)", choices=ERROR_FEEDBACK)
    group_params: str = option(DEFAULT_GROUP_PARAMS, "group scale/zero: MinMax at C bits, or a per-row search of the "
                               "range that minimises the lambda-weighted multi-slice error", choices=GROUP_PARAMS)
    propagate: str = option("master", "what later layers see during the pass: the int-C master weights, the "
                            "full-precision weights (fp), or one slice (e.g. 4)", metavar="master|fp|BITS")
    clip_lambdas: list | None = options.clip_lambdas("--bits-list precision (default: --lambdas)")

    def validate_method(self) -> None:
        from matquant.algorithms.matgptq import check_group_params, propagate_fn
        from matquant.algorithms.multislice_codes import resolve_bits_lambdas
        from matquant.algorithms.slice_params import check_slice_params, check_zero_points
        from matquant.quant.clip_search import check_clip_lambdas

        check_group_params(self.group_params, self.clip)
        check_slice_params(self.slice_params)
        check_zero_points(self.zero_points, symmetric=self.symmetric, param_dtype=self.param_dtype,
                          master_bits=self.master_bits, slicing=self.slicing)
        if self.error_feedback not in ERROR_FEEDBACK:
            raise ValueError(f"error_feedback must be one of {', '.join(ERROR_FEEDBACK)}, got "
                             f"{self.error_feedback!r}.")
        bits, _ = resolve_bits_lambdas(self.master_bits, self.bits_list, self.lambdas)
        propagate_fn(self.propagate, self.master_bits, self.slicing)
        check_clip_lambdas(self.clip_lambdas, self.clip, self.master_bits, bits)
