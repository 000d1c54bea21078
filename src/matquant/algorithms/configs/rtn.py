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
    data_driven = False

    clip: str = options.clip("; weighted reads calibration text")
    slice_params: str = options.slice_params()

    def validate_method(self) -> None:
        from matquant.algorithms.slice_params import check_slice_params
        from matquant.quant.clip_search import check_clip

        check_clip(self.clip)
        check_slice_params(self.slice_params)

    def run(self, model, targets, calib, progress=True, **hooks):
        from matquant.algorithms.rtn import rtn

        return rtn(model, targets, **self.layout_kwargs(hooks.pop("param_dtype")), calib=calib, progress=progress,
                   **self.method_kwargs(), **hooks)
