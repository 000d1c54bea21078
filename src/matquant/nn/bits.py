"""Model-level precision control: set every MatQuantLinear's bits from an int or a per-module map."""
from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping

from torch import nn

from matquant.nn.compiled import is_compiled
from matquant.nn.linear import MatQuantLinear
from matquant.quant.minmax import check_bits

BitsSpec = int | Mapping[str, int]


def matquant_modules(model: nn.Module) -> dict[str, MatQuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MatQuantLinear)}


def _matches(pattern: str, name: str) -> bool:
    if pattern == name or fnmatch.fnmatchcase(name, pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def resolve_bits_map(names: list[str], bits_map: Mapping[str, int]) -> dict[str, int]:
    """Per-module bits from a map whose keys are exact module names, globs or regexes.

    An exact name wins; otherwise the first matching key in the map's order. Modules matched by no key
    are absent from the result. A key that matches no module is an error (it is almost always a typo).
    """
    resolved: dict[str, int] = {}
    for key, b in bits_map.items():
        check_bits(b, f"bits for {key!r}")
    unmatched = [k for k in bits_map if not any(_matches(k, n) for n in names)]
    if unmatched:
        example = names[0] if names else "(model has no MatQuant layers)"
        raise ValueError(
            f"bits map key(s) {unmatched} match no quantized module. Keys are module names, globs or regexes, "
            f"e.g. {example!r}; list the modules with `matquant info DIR`."
        )
    for n in names:
        if n in bits_map:
            resolved[n] = bits_map[n]
            continue
        for key, b in bits_map.items():
            if _matches(key, n):
                resolved[n] = b
                break
    return resolved


def set_bits(model: nn.Module, bits: BitsSpec, slicing: str | None = None) -> dict[str, int]:
    """Switch the precision of a quantized model in place (no reload); returns the per-module bits now in use.

    `bits` is an int (every layer) or a map {module name | glob | regex: bits}; unmatched layers keep theirs.
    `slicing` optionally switches the slicing mode ('paper', 'nested', 'extra') too.
    """
    if is_compiled(model):
        raise ValueError("this model was compiled for decoding (compile_decode / --compile), which fixes its "
                         "precision; reload it (matquant.load(..., bits=...)) and compile again after switching.")
    mods = matquant_modules(model)
    if not mods:
        raise ValueError("model has no MatQuantLinear layers: quantize it first or load a matquant checkpoint.")
    if isinstance(bits, Mapping):
        per_module = resolve_bits_map(list(mods), bits)
    else:
        check_bits(bits)
        per_module = dict.fromkeys(mods, bits)
    too_high = {n: b for n, b in per_module.items() if b > mods[n].master_bits}
    if too_high:
        n, b = next(iter(too_high.items()))
        raise ValueError(f"{len(too_high)} module(s) asked for more bits than their master codes hold, e.g. {n}: "
                         f"{b} > {mods[n].master_bits}.")
    for n, m in mods.items():  # validate every layer first: a failed switch leaves the model unchanged
        m.check_precision(per_module.get(n, m.bits), slicing)
    for n, b in per_module.items():
        mods[n].set_bits(b, slicing)
    if slicing is not None:
        for m in mods.values():
            m.set_bits(m.bits, slicing)
    return {n: m.bits for n, m in mods.items()}


def get_bits(model: nn.Module) -> dict[str, int]:
    return {n: m.bits for n, m in matquant_modules(model).items()}


def average_bits(model: nn.Module) -> float:
    """Weight-count-weighted average code bits over the quantized layers (scales/zeros not counted)."""
    mods = matquant_modules(model).values()
    total = sum(m.qweight.numel() for m in mods)
    return sum(m.bits * m.qweight.numel() for m in mods) / max(total, 1)


def effective_bits(model: nn.Module) -> float:
    """Weight-count-weighted bits per weight including scales, zeros and E.P. overflow storage."""
    mods = matquant_modules(model).values()
    total = sum(m.qweight.numel() for m in mods)
    return sum(m.effective_bits() * m.qweight.numel() for m in mods) / max(total, 1)


def set_backend(model: nn.Module, backend: str, cache_precisions: int | None = None, layout: str | None = None,
                keep=None, high_format: str | None = None) -> int:
    """Choose the compute path of every MatQuantLinear: 'torch' (reference, default), 'cpu', 'triton', 'packed'
    (memory-true CPU runtime) or 'auto' (packed on CPU, triton on CUDA).

    `cache_precisions` (cpu/triton): how many precisions' dequantized weights each layer keeps (switching among
    them with `set_bits` is then free; each costs one dense weight of memory). `layout` (triton): accepted for
    compatibility, the kernel reads the uint8 master codes ('packed' warns once; docs/kernels.md). `keep` (packed):
    precisions kept packed side by side (switching among them is free); `high_format` (packed): 'int4x2' (default)
    or 'bf16' for r > 4. Options not given keep their previous values. Returns the number of layers changed.
    """
    mods = matquant_modules(model)
    if not mods:
        raise ValueError("model has no MatQuantLinear layers: quantize it first or load a matquant checkpoint.")
    for m in mods.values():
        m.set_backend(backend, cache_precisions, layout, keep, high_format)
    return len(mods)
