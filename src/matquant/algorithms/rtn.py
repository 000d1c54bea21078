"""Round-to-nearest: MinMax quantization of each weight independently, no data."""
from __future__ import annotations

from tqdm.auto import tqdm

from matquant.models.targets import linear_weight
from matquant.quant.minmax import QuantizedWeight, quantize_minmax
from matquant.quant.slicing import DEFAULT_SLICING


def rtn(model, targets: list[str], *, master_bits: int, group_size: int, symmetric: bool, param_dtype,
        slicing: str = DEFAULT_SLICING, calib=None, progress: bool = True) -> dict[str, QuantizedWeight]:
    """MinMax round-half-up at `master_bits` (data-free: `calib` is ignored; codes do not depend on `slicing`)."""
    mods = dict(model.named_modules())
    out = {}
    for name in tqdm(targets, desc="RTN", disable=not progress, leave=False):
        w = linear_weight(mods[name]).detach()
        out[name] = quantize_minmax(w, master_bits, group_size, symmetric, param_dtype)
    return out
