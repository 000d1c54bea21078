"""Budget accounting for Mix'n'Match: what a per-module bits map costs, and what a `--budget` allows.

Costs are counted per quantized module m with n_m weights at r bits:

- code bits        n_m · (r + 32 · overflow_m(r))   (E.P. overflow: a 32-bit index per overflowed weight, `extra`
                                                       slicing only; 0 for `paper` and `nested`)
- parameter bits   the group-wise scales and zeros in their stored dtype (independent of r)
- unquantized      every other stored tensor (embeddings, norms, biases, an untied LM head) in its stored dtype

"average bits" = code bits / Σ n_m — the paper's x-axis (an int3 slice is 3.0); "effective bits" adds the
scales/zeros (an int3 slice with fp16 α, z in groups of 64 is 3.5); "total bytes" is everything: the size of the
deployed model when each layer's r-bit codes are bit-packed (the checkpoint itself always holds the int-c codes).

A budget is either average bits ("3.0") or total bytes ("45MB", "0.1GiB"); both become a cap on the code bits.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from matquant.quant.minmax import check_bits
from matquant.quant.slicing import DEFAULT_SLICING, OVERFLOW_INDEX_BITS, check_slicing, overflow_fraction

_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


@dataclass(frozen=True)
class Budget:
    kind: str  # "bits" (average code bits per quantized weight) or "bytes" (total model bytes)
    value: float
    text: str

    def describe(self) -> str:
        return f"{self.value:g} average bits" if self.kind == "bits" else f"{self.text} ({self.value:.0f} bytes)"


def parse_budget(text: str | float | int) -> Budget:
    """'3.0' / 3 → average bits; '45MB', '45 MiB', '0.1GiB', '123456B' → total bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str):
        raise ValueError(f"budget must be a number of bits (e.g. 3.0) or a size (e.g. 45MB), got {text!r}.")
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m:
        raise ValueError(f"cannot read budget {text!r}: give average bits per weight (e.g. 3.0) or a total size "
                         "(e.g. 45MB, 120MiB, 0.1GiB).")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit in ("", "bits", "bit"):
        if not 0 < value <= 8:
            raise ValueError(f"budget {text!r}: average bits must be in (0, 8]; for a size add a unit (e.g. 45MB).")
        return Budget("bits", value, text.strip())
    if unit not in _UNITS:
        raise ValueError(f"budget {text!r}: unknown unit {m.group(2)!r}; use one of B, KB, MB, GB, KiB, MiB, GiB "
                         "(or no unit for average bits).")
    if value <= 0:
        raise ValueError(f"budget {text!r} must be positive.")
    return Budget("bytes", value * _UNITS[unit], text.strip())


@dataclass
class CostModel:
    """Sizes of one quantized model: enough to price any bits map without touching the weights."""

    numel: dict[str, int]  # quantized module -> number of weights
    param_bits: dict[str, int]  # quantized module -> bits of its scales + zeros (+ bias)
    unquantized_bytes: int
    master_bits: int = 8
    slicing: str = DEFAULT_SLICING
    overflow: dict[tuple[str, int], float] = field(default_factory=dict)  # (module, r) -> fraction, extra only

    @property
    def names(self) -> list[str]:
        return list(self.numel)

    @property
    def total_weights(self) -> int:
        return sum(self.numel.values())

    # ---- construction ----
    @classmethod
    def from_model(cls, model, slicing: str | None = None, ladder: Sequence[int] = ()) -> "CostModel":
        from matquant.nn.bits import matquant_modules

        mods = matquant_modules(model)
        if not mods:
            raise ValueError("model has no MatQuantLinear layers: quantize it first or load a matquant checkpoint.")
        slicing = check_slicing(slicing or next(iter(mods.values())).slicing)
        numel = {n: m.qweight.numel() for n, m in mods.items()}
        pbits = {n: 8 * sum(t.numel() * t.element_size() for t in (m.scales, m.zeros, m.bias) if t is not None)
                 for n, m in mods.items()}
        owned = {f"{n}.{leaf}" for n in mods for leaf in ("qweight", "scales", "zeros", "bias")}
        seen, unq = set(), 0
        for k, t in model.state_dict().items():  # what a checkpoint stores (tied tensors once)
            if k in owned or (t.numel() and t.data_ptr() in seen):
                continue
            seen.add(t.data_ptr())
            unq += t.numel() * t.element_size()
        cm = cls(numel, pbits, unq, max(m.master_bits for m in mods.values()), slicing)
        if slicing == "extra":
            for n, m in mods.items():
                for r in ladder:
                    if r < m.master_bits:
                        cm.overflow[(n, r)] = overflow_fraction(m.master_codes(), m.master_bits, r, "extra")
        return cm

    @classmethod
    def from_checkpoint(cls, ckpt_dir, slicing: str | None = None, ladder: Sequence[int] = ()) -> "CostModel":
        """From config.json and the safetensors header only (codes are read only for `extra` overflow)."""
        from matquant.format.checkpoint import merged_header, read_quant_config, weight_headers

        cfg, q = read_quant_config(ckpt_dir)
        slicing = check_slicing(slicing or q.slicing)
        path = Path(ckpt_dir)
        header = merged_header(weight_headers(ckpt_dir))  # {name: (dtype, shape)}, either layout

        def nbytes(info):
            return math.prod(info[1]) * info[0].itemsize

        numel, pbits = {}, {}
        owned = set()
        for m in q.modules:
            k = f"{m}.qweight"
            if k not in header:
                raise ValueError(f"{path} has no tensor {k}; the checkpoint is inconsistent with its config.")
            numel[m] = math.prod(header[k][1])
            pbits[m] = 8 * sum(nbytes(header[f"{m}.{leaf}"]) for leaf in ("scales", "zeros", "bias")
                               if f"{m}.{leaf}" in header)
            owned.update(f"{m}.{leaf}" for leaf in ("qweight", "scales", "zeros", "bias"))
        unq = sum(nbytes(info) for k, info in header.items() if k not in owned)
        cm = cls(numel, pbits, unq, q.master_bits, slicing)
        if slicing == "extra" and ladder:
            from matquant.format.shards import TensorReader

            reader = TensorReader(ckpt_dir)
            for m in q.modules:
                codes = reader.get(f"{m}.qweight")
                for r in ladder:
                    if r < q.master_bits:
                        cm.overflow[(m, r)] = overflow_fraction(codes, q.master_bits, r, "extra")
        return cm

    # ---- pricing ----
    def code_bits(self, name: str, bits: int) -> float:
        ovf = self.overflow.get((name, bits), 0.0) if self.slicing == "extra" else 0.0
        return self.numel[name] * (bits + OVERFLOW_INDEX_BITS * ovf)

    def map_code_bits(self, bits_map: Mapping[str, int]) -> float:
        self._check_complete(bits_map)
        return sum(self.code_bits(n, bits_map[n]) for n in self.numel)

    def average_bits(self, bits_map: Mapping[str, int]) -> float:
        """Code bits per quantized weight (incl. E.P. overflow); an int3 slice is 3.0."""
        return self.map_code_bits(bits_map) / self.total_weights

    def effective_bits(self, bits_map: Mapping[str, int]) -> float:
        """Bits per quantized weight including scales, zeros (and overflow), as MatQuantLinear.effective_bits."""
        return (self.map_code_bits(bits_map) + sum(self.param_bits.values())) / self.total_weights

    def total_bytes(self, bits_map: Mapping[str, int]) -> int:
        """Whole model: bit-packed codes + scales/zeros + unquantized tensors, in bytes."""
        self._check_complete(bits_map)
        code = sum(math.ceil(self.code_bits(n, bits_map[n]) / 8) for n in self.numel)
        return code + sum(self.param_bits.values()) // 8 + self.unquantized_bytes

    def uniform(self, bits: int) -> dict[str, int]:
        return dict.fromkeys(self.numel, bits)

    def _check_complete(self, bits_map):
        missing = [n for n in self.numel if n not in bits_map]
        if missing:
            raise ValueError(f"bits map has no entry for {len(missing)} quantized module(s), e.g. {missing[0]!r}.")

    # ---- budgets ----
    def code_bits_cap(self, budget: Budget, lowest: int, highest: int | None = None) -> float:
        """The budget as a cap on total code bits; errors when it is below all-`lowest` or above all-`highest`."""
        highest = highest or self.master_bits
        if budget.kind == "bits":
            cap = budget.value * self.total_weights
            measure, unit = self.average_bits, "{:.3f} average bits".format
        else:
            cap = 8 * budget.value - (8 * self.unquantized_bytes + sum(self.param_bits.values()))
            measure, unit = self.total_bytes, lambda v: f"{v / 2**20:.2f} MiB ({v:.0f} bytes)"
        lo, hi = measure(self.uniform(lowest)), measure(self.uniform(highest))
        if budget.value < lo - 1e-9:
            raise ValueError(f"budget {budget.text} is below the smallest configuration (every layer at int{lowest}: "
                             f"{unit(lo)}); raise the budget or add lower bits to --ladder.")
        if budget.value > hi + 1e-9:
            raise ValueError(f"budget {budget.text} is above every layer at int{highest} ({unit(hi)}): nothing to "
                             f"trade off; use --bits {highest} or a smaller budget.")
        return cap

    def summary(self, bits_map: Mapping[str, int]) -> dict:
        return {"average_bits": round(self.average_bits(bits_map), 4),
                "effective_bits": round(self.effective_bits(bits_map), 4),
                "total_bytes": int(self.total_bytes(bits_map))}


def validate_bits_map(bits_map, modules: Sequence[str], master_bits: int = 8) -> dict[str, int]:
    """Check a user bits map against the checkpoint's modules (names, globs or regexes) before loading weights.

    Returns the resolved {module: bits}; modules matched by no key are absent.
    """
    from matquant.nn.bits import resolve_bits_map

    if not isinstance(bits_map, Mapping) or not bits_map:
        raise ValueError("bits map must be a non-empty JSON object {module name|glob|regex: bits}.")
    for k, b in bits_map.items():
        check_bits(b, f"bits for {k!r}")
        if b > master_bits:
            raise ValueError(f"bits for {k!r} is {b}, more than the checkpoint's master bits ({master_bits}).")
    return resolve_bits_map(list(modules), bits_map)


def check_ladder(ladder: Sequence[int], master_bits: int) -> tuple[int, ...]:
    ladder = tuple(sorted(set(ladder)))
    if not ladder:
        raise ValueError("the ladder of precisions is empty; pass e.g. --ladder 2,3,4,6,8.")
    for b in ladder:
        check_bits(b, "ladder bits")
    if ladder[-1] > master_bits:
        raise ValueError(f"ladder {list(ladder)} goes above the checkpoint's master bits ({master_bits}).")
    return ladder
