"""Mix'n'Match fixed schedules: per-layer bits with a target average, shaped by layer position.

Every schedule picks, for each transformer block, a precision from `ladder` so that the weight-count-weighted
average bits is as close as possible to (never above) `target`:

- uniform         every block the same (two adjacent ladder values spread evenly when target is between them)
- pyramid         highest bits in the middle blocks, lowest at the first and last (the paper's best fixed schedule)
- reverse_pyramid lowest bits in the middle, highest at both ends
- increasing      bits grow with depth
- decreasing      bits shrink with depth

The lowest precision a schedule may use (its *floor*) depends on the budget by default (``floor="auto"``): the
largest ladder value strictly below the target (the ladder's lowest when the target is that value). So a pyramid at
6 bits puts int4 at its ends, not int2: untrained int2 slices are catastrophic (≫1000× fp32 perplexity with RTN),
so a high-budget map with int2 ends can be far worse than uniform. ``floor="min"`` always spans the whole ladder
(the ends go to its lowest value, the earlier behaviour); an int floor sets it directly.
"""
from __future__ import annotations

from collections.abc import Sequence

SCHEDULES = ("uniform", "pyramid", "reverse_pyramid", "increasing", "decreasing")
DEFAULT_LADDER = (2, 3, 4, 6, 8)
FLOORS = ("auto", "min")


def resolve_floor(target: float, ladder: Sequence[int], floor: int | str = "auto") -> int:
    """The lowest ladder value a schedule at `target` average bits may use (see the module docstring)."""
    ladder = sorted(set(ladder))
    if floor == "min":
        return ladder[0]
    if floor == "auto":
        below = [b for b in ladder if b < target - 1e-9]
        return below[-1] if below else ladder[0]
    if isinstance(floor, str) and floor.isdigit():
        floor = int(floor)
    if isinstance(floor, int) and not isinstance(floor, bool):
        if floor not in ladder:
            raise ValueError(f"floor {floor} is not on the ladder {ladder}; pick one of its values, 'auto' or 'min'.")
        if floor > target + 1e-9:
            raise ValueError(f"floor {floor} bits is above the target {target}: no block could go below it. "
                             f"Lower the floor or use floor='auto'.")
        return floor
    raise ValueError(f"floor must be 'auto', 'min' or a ladder value, got {floor!r}.")


def _priority(n: int, schedule: str) -> list[float]:
    """Higher = gets more bits. Ties broken by index for determinism."""
    if n == 1:
        return [1.0]
    pos = [i / (n - 1) for i in range(n)]
    if schedule == "pyramid":
        return [1 - abs(2 * p - 1) for p in pos]
    if schedule == "reverse_pyramid":
        return [abs(2 * p - 1) for p in pos]
    if schedule == "increasing":
        return pos
    if schedule == "decreasing":
        return [1 - p for p in pos]
    if schedule == "uniform":
        # spread upgrades evenly: a low-discrepancy order over the blocks
        order = sorted(range(n), key=lambda i: ((i * 0.6180339887) % 1.0))
        return [1 - order.index(i) / n for i in range(n)]
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}.")


def schedule_bits(n_blocks: int, target: float, schedule: str = "pyramid",
                  ladder: Sequence[int] = DEFAULT_LADDER, weights: Sequence[float] | None = None,
                  floor: int | str = "auto") -> list[int]:
    """Per-block bits. `weights` are the blocks' quantized weight counts (default equal).

    Only ladder values >= the floor (`resolve_floor`) are used.

    The schedule's profile p_i in [0, 1] is scaled: block i gets the largest ladder value <= lo + t·p_i·(hi − lo),
    with t the largest scale whose weighted average stays <= target (bisection). Budget left over raises single
    blocks one ladder step, highest profile first. The result has the schedule's shape at the requested average.
    """
    ladder = sorted(set(ladder))
    if n_blocks < 1:
        raise ValueError("need at least one block")
    w = list(weights) if weights is not None else [1.0] * n_blocks
    total = sum(w)
    lo, hi = ladder[0], ladder[-1]
    if not lo - 1e-9 <= target <= hi + 1e-9:
        raise ValueError(f"target {target} bits is outside what the ladder {ladder} can reach [{lo}, {hi}].")
    ladder = [b for b in ladder if b >= resolve_floor(target, ladder, floor)]
    lo = ladder[0]
    prio = _priority(n_blocks, schedule)
    prio_shape = [1.0] * n_blocks if schedule == "uniform" else prio  # uniform: the priority only orders upgrades

    def levels(t):
        out = []
        for p in prio_shape:
            v = lo + t * p * (hi - lo)
            out.append(max(k for k, b in enumerate(ladder) if b <= v + 1e-9))
        return out

    def avg(lv):
        return sum(ladder[l] * wi for l, wi in zip(lv, w)) / total

    a, b = 0.0, 1.0
    while avg(levels(b)) <= target + 1e-9 and b < 1e6:
        a, b = b, b * 2
    for _ in range(60):
        m = (a + b) / 2
        a, b = (m, b) if avg(levels(m)) <= target + 1e-9 else (a, m)
    level = levels(a)
    budget = (target - avg(level)) * total
    order = sorted(range(n_blocks), key=lambda i: (-prio[i], i))
    moved = True
    while moved:
        moved = False
        for i in order:
            if level[i] < len(ladder) - 1:
                cost = (ladder[level[i] + 1] - ladder[level[i]]) * w[i]
                if cost <= budget + 1e-9:
                    budget -= cost
                    level[i] += 1
                    moved = True  # one step per block per pass keeps the shape
    return [ladder[l] for l in level]


def bits_map_for_schedule(layer_modules: dict[int, list[str]], target: float, schedule: str,
                          ladder: Sequence[int] = DEFAULT_LADDER, numels: dict[str, int] | None = None,
                          floor: int | str = "auto") -> dict[str, int]:
    """{module name: bits} for the quantized modules grouped by block index."""
    blocks = sorted(layer_modules)
    weights = [sum((numels or {}).get(m, 1) for m in layer_modules[b]) for b in blocks]
    per_block = schedule_bits(len(blocks), target, schedule, ladder, weights, floor)
    return {m: b for blk, b in zip(blocks, per_block) for m in layer_modules[blk]}


GRANULARITIES = ("layer", "module")


def group_units(names: Sequence[str], granularity: str = "layer") -> list[list[str]]:
    """Units that share one precision, in depth order.

    - ``layer``  every quantized module of a transformer block together (modules without a block index: one unit
                 each, at the end)
    - ``module`` every quantized module on its own (sub-module granularity: e.g. down_proj apart from gate/up)
    """
    from matquant.models.targets import layer_index

    if granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {granularity!r}; choose one of {', '.join(GRANULARITIES)}.")
    if granularity == "module":
        order = sorted(range(len(names)), key=lambda i: (layer_index(names[i]) is None,
                                                         layer_index(names[i]) or 0, i))
        return [[names[i]] for i in order]
    blocks: dict[int, list[str]] = {}
    loose = []
    for n in names:
        li = layer_index(n)
        (blocks.setdefault(li, []) if li is not None else loose).append(n)
    return [blocks[b] for b in sorted(blocks)] + [[n] for n in loose]


def schedule_map(cost, cap_code_bits: float, schedule: str, ladder: Sequence[int] = DEFAULT_LADDER,
                 granularity: str = "layer", floor: int | str = "auto") -> dict[str, int]:
    """{module: bits} of a fixed schedule whose code bits (see budget.CostModel) stay within `cap_code_bits`.

    The schedule's profile runs over the units in depth order (blocks, or single modules at ``module``
    granularity). With `extra` slicing the overflow storage can push a map over the cap: the target is then
    lowered until it fits.
    """
    units = group_units(cost.names, granularity)
    weights = [sum(cost.numel[m] for m in u) for u in units]
    target = min(cap_code_bits / cost.total_weights, max(ladder))
    fl = resolve_floor(target, ladder, floor)  # bad floors fail here, before anything else
    for _ in range(200):
        t = max(target, min(ladder))
        f = fl if fl <= t + 1e-9 else "auto"  # the target was lowered below the floor (extra slicing's overflow)
        per_unit = schedule_bits(len(units), t, schedule, ladder, weights, f)
        bits_map = {m: b for u, b in zip(units, per_unit) for m in u}
        if cost.map_code_bits(bits_map) <= cap_code_bits + 1e-6 or target <= min(ladder):
            return bits_map
        target -= 0.01
    return bits_map
