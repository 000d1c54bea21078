from matquant.nn.bits import average_bits, effective_bits, get_bits, matquant_modules, resolve_bits_map, set_backend, set_bits
from matquant.nn.linear import MatQuantLinear

__all__ = ["MatQuantLinear", "set_bits", "get_bits", "matquant_modules", "resolve_bits_map", "average_bits",
           "effective_bits", "set_backend"]
