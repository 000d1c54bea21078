"""Level vectors of the Mix'n'Match search and the moves on them (numpy only, no model): a map assigns each unit
(a group of modules, see schedules.group_units) a level, an index into the precision ladder.

- `unit_costs`: code bits of each unit at each ladder precision; `levels_to_map` / `map_to_levels` convert.
- `knapsack`: the levels minimising summed per-unit sensitivities under the code-bits cap (the search's start).
- `mutate`: a budget-keeping random move (the search's offspring).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def unit_costs(cost, units, ladder) -> np.ndarray:
    return np.array([[sum(cost.code_bits(m, b) for m in u) for b in ladder] for u in units], dtype=np.float64)


def levels_to_map(units, ladder, levels) -> dict[str, int]:
    return {m: ladder[lv] for u, lv in zip(units, levels) for m in u}


def map_to_levels(units, ladder, bits_map) -> list[int]:
    return [ladder.index(bits_map[u[0]]) for u in units]


def knapsack(sens: np.ndarray, costs: np.ndarray, cap: float, resolution: int = 20000) -> list[int]:
    """Multiple-choice knapsack by dynamic programming: min Σ sens[u, l_u] s.t. Σ costs[u, l_u] <= cap.

    Integer costs are divided by their gcd (exact when that leaves <= 5·resolution capacity steps); otherwise
    costs are rounded *up* to cap/resolution steps, so the answer always fits the cap.
    """
    n_units, n_levels = costs.shape
    if float(costs.min(axis=1).sum()) > cap + 1e-6:
        raise ValueError("the cap is below every unit at the lowest precision.")
    unit = cap / resolution
    if np.all(np.abs(costs - np.round(costs)) < 1e-9):
        g = float(np.gcd.reduce(np.round(costs).astype(np.int64).ravel()))
        if g > 0 and cap / g <= 5 * resolution:
            unit = g
    w = np.ceil(costs / unit - 1e-9).astype(np.int64)
    C = int(np.floor(cap / unit + 1e-9))
    dp = np.full(C + 1, np.inf)
    dp[0] = 0.0
    choice = np.zeros((n_units, C + 1), dtype=np.int16)
    for u in range(n_units):
        new = np.full(C + 1, np.inf)
        for lvl in range(n_levels):
            wl = w[u, lvl]
            if wl > C:
                continue
            cand = np.full(C + 1, np.inf)
            cand[wl:] = dp[: C + 1 - wl] + sens[u, lvl]
            better = cand < new
            new[better] = cand[better]
            choice[u, better] = lvl
        dp = new
    c = int(np.argmin(dp))
    if not np.isfinite(dp[c]):
        raise ValueError("no assignment fits the cap.")
    levels = [0] * n_units
    for u in range(n_units - 1, -1, -1):
        levels[u] = int(choice[u, c])
        c -= int(w[u, levels[u]])
    return levels


def mutate(levels: Sequence[int], costs: np.ndarray, cap: float, rng: np.random.Generator,
           n_steps: int) -> list[int] | None:
    """Budget-keeping mutation: n_steps times move one unit a ladder step up and others down until the cap holds;
    then fill spare budget with random single up-steps. None if no valid move exists."""
    child = list(levels)
    n_units, n_levels = costs.shape

    def total():
        return float(sum(costs[u, child[u]] for u in range(n_units)))

    for _ in range(n_steps):
        ups = [u for u in range(n_units) if child[u] < n_levels - 1]
        if not ups:
            return None
        u = int(rng.choice(ups))
        child[u] += 1
        guard = 0
        while total() > cap + 1e-6:
            downs = [d for d in range(n_units) if d != u and child[d] > 0]
            if not downs or guard > 10 * n_units:
                return None
            d = int(rng.choice(downs))
            child[d] -= 1
            guard += 1
    while True:
        spare = cap - total()
        fits = [u for u in range(n_units) if child[u] < n_levels - 1
                and costs[u, child[u] + 1] - costs[u, child[u]] <= spare + 1e-6]
        if not fits:
            break
        u = int(rng.choice(fits))
        child[u] += 1
    return child
