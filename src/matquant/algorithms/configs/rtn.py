"""RTNConfig: round-to-nearest, data-free unless its clipping search is weighted or slices get their own params."""
from __future__ import annotations

from dataclasses import dataclass

from matquant.algorithms.configs import options
from matquant.algorithms.configs.base import MethodConfig, register_config


@register_config
@dataclass
class RTNConfig(MethodConfig):
    name = "rtn"
    summary = "round-to-nearest MinMax (no data)"
    function = "matquant.algorithms.rtn:rtn"
    data_driven = False

    clip: str = options.clip("; weighted reads calibration text")
    slice_params: str = options.slice_params()
    zero_points: str = options.zero_points()

    def validate_method(self) -> None:
        from matquant.algorithms.slice_params import check_zero_points

        super().validate_method()
        check_zero_points(self.zero_points, symmetric=self.symmetric, param_dtype=self.param_dtype,
                          master_bits=self.master_bits, slicing=self.slicing)
