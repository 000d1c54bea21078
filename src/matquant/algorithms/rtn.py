"""Round-to-nearest: MinMax quantization of each weight independently, no data."""
from __future__ import annotations

from tqdm.auto import tqdm

from matquant.models.targets import linear_weight
from matquant.quant.minmax import QuantizedWeight, quantize_minmax


def rtn(model, targets: list[str], *, master_bits: int, group_size: int, symmetric: bool, param_dtype,
        progress: bool = True, **_) -> dict[str, QuantizedWeight]:
    mods = dict(model.named_modules())
    out = {}
    for name in tqdm(targets, desc="RTN", disable=not progress, leave=False):
        w = linear_weight(mods[name]).detach()
        out[name] = quantize_minmax(w, master_bits, group_size, symmetric, param_dtype)
    return out
