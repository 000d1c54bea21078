"""Elastic loading: the Mix'n'Match map whose *packed runtime* memory fits a byte budget.

What the packed CPU runtime (`kernels.cpu_packed`) holds per quantized layer at r bits:

- r = 2, 3  the low-bit formats (`kernels.lowbit`: 2-bit codes, + a 1-bit plane for int3, fp16 (A, M) per group)
          when the low-bit kernel is available and takes the layer; else 4-bit codes like int4
- r = 4  4-bit codes + one bf16 (scale, zero) pair per kernel group
- r > 4  ``int4x2``: two 4-bit planes = 8 bits + two pairs per group; ``bf16``: a dense bf16 weight (16 bits)
- bias, and for a layer the kernel declines: the master codes, scales, zeros and a dense fp32 weight (cpu path)
- with keep_master on a nested layer, the master codes as two packed planes (8 bits), which the int4 and
  int-master slices are (no copy), and the other slices mask into one new plane (4 bits)

So in memory four precisions differ: int2, int3, int4 and int8 (int5-7 cost what int8 costs). The map is the
existing fixed *pyramid* schedule (`schedules.schedule_map`, the paper's best fixed schedule: more bits to the middle
blocks) at the largest target whose exact runtime bytes fit, on the ladder (4, 8) when every layer at int4 fits (an
int4/int8 mix is far better than any mix that puts layers at int2: docs/results.md), else on (2, 3, 4) when the
low-bit format makes that smaller. It uses no sensitivity data; pass an explicit bits map (e.g. from `matquant
mixnmatch search`) for a searched one.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from torch import nn

from matquant.mixnmatch.budget import CostModel, parse_budget
from matquant.mixnmatch.schedules import schedule_map

RUNTIME_LADDER = (4, 8)
LOW_LADDER = (2, 3, 4)  # below every layer at int4, with the low-bit kernel
DEFAULT_SCHEDULE = "pyramid"


def packed_layer_bytes(m, bits: int, high_format: str = "int4x2", keep_master: bool = False) -> int:
    """Bytes the packed runtime holds for MatQuantLinear `m` at `bits` (see the module docstring)."""
    from matquant.kernels import cpu_packed, master_planes
    from matquant.kernels.packed_backend import layer_reason, planes_eligible, slice_bytes

    n, k = m.out_features, m.in_features
    bias = 0 if m.bias is None else m.bias.numel() * m.bias.element_size()
    # keep_master on a nested layer: the master is held as packed planes (`hold_master_packed`), 4 bits per weight
    # and plane, and a slice at r = 4 or r = master bits is those planes (no copy of codes; only its tables)
    held = keep_master and planes_eligible(m)
    codes = n * k * (2 if m.master_bits > 4 else 1) // 2 if held else n * k * m.master_bits // 8
    params = [getattr(m, t) for t in m.code_tensor_names() if t != "qweight"]  # shared + slice-own (α, z)
    master = codes + sum(t.numel() * t.element_size() for t in params)
    if layer_reason(m, bits, high_format=high_format) is not None:  # declined: master + a dense fp32 weight (cpu path)
        return master + n * k * 4 + bias
    low = slice_bytes(m, bits) if bits < 4 else None
    if low is not None:  # the low-bit format: its own codes and tables, never shared with the master planes
        body = low
    elif bits > 4 and high_format == "bf16":
        body = n * k * 2
    else:
        planes = 1 if bits <= 4 else 2
        groups = k // cpu_packed.kernel_group(m.group_size)
        copies = 1 if held and bits > 4 else planes  # r > 4 from planes: the hi plane is always shared
        if held and master_planes.shares_planes(bits, m.master_bits):
            copies = 0
        body = copies * n * k // 2 + planes * groups * n * 2 * 2
    return body + bias + (master if keep_master else 0)


def runtime_bytes(model: nn.Module, bits_map: Mapping[str, int], fixed_bytes: int, high_format: str = "int4x2",
                  keep_master: bool = False) -> int:
    from matquant.nn.bits import matquant_modules

    mods = matquant_modules(model)
    return fixed_bytes + sum(packed_layer_bytes(mods[n], b, high_format, keep_master) for n, b in bits_map.items())


def fit_bits_map(model: nn.Module, budget, fixed_bytes: int, high_format: str = "int4x2",
                 keep_master: bool = False, schedule: str = DEFAULT_SCHEDULE) -> tuple[dict[str, int], int]:
    """(bits map, predicted resident bytes) of the highest pyramid map within `budget`: on (4, 8) when every layer
    at int4 fits, else on (2, 3, 4) when the low-bit format is smaller than int4 (see the module docstring).

    `budget`: total bytes ('100MB', '95MiB', an int) or average bits per quantized weight ('6.0', storage bits:
    int2 = 2, int4 = 4, int8 = 8). `fixed_bytes`: everything outside the quantized layers (embeddings, norms, ...).
    """
    b = parse_budget(budget)
    cost = CostModel.from_model(model)
    total_w = cost.total_weights

    def bytes_of(bm):
        return runtime_bytes(model, bm, fixed_bytes, high_format, keep_master)

    int4 = bytes_of(cost.uniform(4))
    low_smaller = bytes_of(cost.uniform(LOW_LADDER[0])) < int4
    if b.kind == "bits":
        floor = LOW_LADDER[0] if low_smaller else RUNTIME_LADDER[0]
        if b.value < floor - 1e-9:
            raise ValueError(f"budget {b.text} average bits is below what the packed CPU runtime holds: every layer "
                             f"at int{floor} ({floor}.0) is the smallest"
                             + ("" if low_smaller else " (int2/int3 are stored as 4-bit codes without the low-bit "
                                "kernel)") + ". Give more bits, or a byte budget.")
        ladder = RUNTIME_LADDER if b.value >= RUNTIME_LADDER[0] - 1e-9 else LOW_LADDER
        bm = schedule_map(cost, min(b.value, ladder[-1]) * total_w, schedule, ladder)
        return bm, bytes_of(bm)
    ladder = RUNTIME_LADDER if b.value >= int4 or not low_smaller else LOW_LADDER
    lo_map, hi_map = cost.uniform(ladder[0]), cost.uniform(ladder[-1])
    lo, hi = bytes_of(lo_map), bytes_of(hi_map)
    if b.value < lo:
        raise ValueError(f"budget {b.text} ({b.value / 2**20:.1f} MiB) is below the smallest model the packed CPU "
                         f"runtime can hold: every quantized layer at int{ladder[0]} = {lo / 2**20:.1f} MiB ({lo} "
                         "bytes" + ("" if low_smaller else "; int2/int3 are stored as 4-bit codes without the low-bit "
                                    "kernel, so they are no smaller") + "). Raise the budget"
                         + (" or load with keep_master=False." if keep_master else "."))
    if b.value >= hi:
        return hi_map, hi
    # bisect the code-bit cap of the schedule on the exact runtime bytes
    lo_cap, hi_cap = ladder[0] * total_w, ladder[-1] * total_w
    best = lo_map
    for _ in range(40):
        mid = (lo_cap + hi_cap) / 2
        bm = schedule_map(cost, mid, schedule, ladder)
        if bytes_of(bm) <= b.value:
            best, lo_cap = bm, mid
        else:
            hi_cap = mid
        if hi_cap - lo_cap < 8 * 1024:
            break
    return best, bytes_of(best)


def describe(bits_map: Mapping[str, int]) -> str:
    counts = Counter(bits_map.values())
    return ", ".join(f"{c} layers int{b}" for b, c in sorted(counts.items(), reverse=True))


__all__ = ["RUNTIME_LADDER", "LOW_LADDER", "DEFAULT_SCHEDULE", "packed_layer_bytes", "runtime_bytes", "fit_bits_map", "describe"]
