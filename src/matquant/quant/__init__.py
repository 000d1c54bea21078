"""Pure quantization math: MinMax quantizer, slicing, straight-through estimators."""
from matquant.quant.minmax import (
    QuantizedWeight,
    check_bits,
    dequantize_codes,
    minmax_params,
    quantize_codes,
    quantize_minmax,
    resolve_group_size,
)
from matquant.quant.rounding import round_half_up, round_half_up_ste
from matquant.quant.slicing import (
    DEFAULT_SLICING,
    SLICING_MODES,
    check_slicing,
    codes_to_master_units,
    effective_code_bits,
    overflow_fraction,
    slice_codes,
    slice_master,
    slice_master_ste,
)
from matquant.quant.ste import fake_quant_ste


def dequantize(qw: QuantizedWeight, bits: int | None = None, mode: str = DEFAULT_SLICING):
    """Float32 weight of the `bits`-bit slice (default: the master precision) of a QuantizedWeight; a slice with
    its own group parameters (`qw.slice_params`, fitted for the slicing `mode` it was quantized with) uses them."""
    r = qw.bits if bits is None else bits
    s, z = (qw.slice_params or {}).get(r, (qw.scales, qw.zeros))
    return dequantize_codes(slice_master(qw.codes, qw.bits, r, mode), s, z)


__all__ = [
    "QuantizedWeight", "check_bits", "dequantize", "dequantize_codes", "minmax_params", "quantize_codes",
    "quantize_minmax", "resolve_group_size", "round_half_up", "round_half_up_ste", "SLICING_MODES", "DEFAULT_SLICING",
    "check_slicing", "codes_to_master_units", "effective_code_bits", "overflow_fraction", "slice_codes",
    "slice_master", "slice_master_ste", "fake_quant_ste",
]
