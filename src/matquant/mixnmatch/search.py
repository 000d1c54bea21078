"""Search per-unit precisions under a budget, minimising KL to the fp32 model (Mix'n'Match search).

Three stages, each cached/resumable in a work folder:

1. **Sensitivity** (fast, budget-independent): KL on a few calibration windows when one unit alone runs at each
   ladder precision and every other unit at the top precision — U × (|ladder|−1) forwards.
2. **Knapsack init**: assuming the KL increases add up, pick one precision per unit minimising the summed
   sensitivity under the code-bits cap (multiple-choice knapsack, solved exactly by dynamic programming). The starting parent is the best, on the calibration KL, of this map and every fixed
   schedule at the same budget — so the search never returns a map worse (on calibration KL) than those.
3. **Evolution** (EvoPress-style, Sieberling et al. 2024): each generation makes `offspring` children of the
   parent by budget-keeping mutations (one unit one ladder step up, others down until the cap holds, then spare
   budget filled by random up-steps); children are ranked on 1 calibration window, the best `survivors` re-ranked
   with the parent on more windows (growing token counts), and the winner becomes the parent. Windows are drawn
   per generation from a seeded RNG, so a run is deterministic for a seed and can resume from its JSON state
   (written atomically after every generation).

The level-vector pieces (costs, knapsack, mutation) are in mixnmatch/levels.py; this module runs the model.
"""
from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from matquant.format.atomic import atomic_write_json
from matquant.mixnmatch.levels import knapsack, levels_to_map, map_to_levels, mutate, unit_costs
from matquant.mixnmatch.schedules import FLOORS, SCHEDULES, group_units, schedule_map
from matquant.nn.bits import set_bits

STATE_VERSION = 1


@dataclass
class SearchConfig:
    ladder: tuple[int, ...] = (2, 3, 4, 6, 8)
    granularity: str = "layer"
    seed: int = 0
    generations: int = 20
    offspring: int = 8
    stage_windows: tuple[int, ...] = (1, 4)  # calibration windows per selection stage (growing)
    survivors: tuple[int, ...] = (2,)  # children kept after each stage but the last
    max_mutations: int = 3
    sens_windows: int = 1
    init: str = "sensitivity"  # "sensitivity" (knapsack + fixed schedules) or "schedules" (fixed only)

    def __post_init__(self):
        self.ladder = tuple(self.ladder)
        self.stage_windows = tuple(self.stage_windows)
        self.survivors = tuple(self.survivors)
        if len(self.survivors) != len(self.stage_windows) - 1:
            raise ValueError(f"need one survivor count per stage but the last: stages {self.stage_windows}, "
                             f"survivors {self.survivors}.")
        if any(s < 1 for s in self.survivors) or any(w < 1 for w in self.stage_windows):
            raise ValueError("stage windows and survivor counts must be >= 1.")
        if self.generations < 0 or self.offspring < 1 or self.max_mutations < 1 or self.sens_windows < 1:
            raise ValueError("generations must be >= 0; offspring, max_mutations and sens_windows >= 1.")
        if self.init not in ("sensitivity", "schedules"):
            raise ValueError(f"init must be 'sensitivity' or 'schedules', got {self.init!r}.")


@dataclass
class SearchResult:
    bits_map: dict[str, int]
    levels: list[int]
    kl: float  # KL of the result on the last stage's windows of the last generation
    init_kl: float
    init_from: str
    history: list[dict] = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    tokens: int = 0


def _key(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def sensitivity_table(evaluate: Callable[[list[int], list[int]], float], n_units: int, n_levels: int, windows,
                      path=None, meta=None, progress: bool = True) -> np.ndarray:
    """KL with unit u alone at level l (others at the top level); resumable through the JSON at `path`."""
    top = n_levels - 1
    rows: list[list[float]] = []
    base = None
    if path is not None and Path(path).exists():
        st = json.loads(Path(path).read_text())
        if st.get("meta") == meta:
            rows, base = st["rows"], st["base"]
    if base is None:
        base = evaluate([top] * n_units, windows)
    bar = tqdm(total=n_units * top, initial=len(rows) * top, desc="sensitivity", disable=not progress, unit="eval")
    for u in range(len(rows), n_units):
        row = []
        for lvl in range(top):
            levels = [top] * n_units
            levels[u] = lvl
            row.append(evaluate(levels, windows))
            bar.update(1)
        rows.append(row + [base])
        if path is not None:
            atomic_write_json(path, {"version": STATE_VERSION, "meta": meta, "base": base, "rows": rows})
    bar.close()
    return np.array(rows, dtype=np.float64)


def search(model, fitness, cost, cap: float, slicing: str, cfg: SearchConfig, work_dir=None, identity: str = "",
           progress: bool = True, log: Callable[[str], None] | None = None) -> SearchResult:
    """Search a {module: bits} map with code bits <= `cap` (see budget.CostModel) minimising calibration KL.

    `fitness` is a KLFitness over the calibration pool; `model` is the quantized model (its bits are changed in
    place and left at the result). `work_dir` holds the resumable state; `identity` names the checkpoint and
    reference so that a state from another search is never reused.
    """
    log = log or (lambda s: None)
    ladder = tuple(cfg.ladder)
    units = group_units(cost.names, cfg.granularity)
    costs = unit_costs(cost, units, ladder)
    n_units, n_levels = costs.shape
    n_pool = fitness.n_windows
    if max(cfg.stage_windows) > n_pool or cfg.sens_windows > n_pool:
        raise ValueError(f"the calibration pool has {n_pool} windows but the search asks for "
                         f"{max(max(cfg.stage_windows), cfg.sens_windows)}; raise --calib-windows.")
    set_bits(model, int(max(ladder)), slicing)

    def evaluate(levels, windows) -> float:
        """Set a level vector on the model and return its KL on the given windows."""
        set_bits(model, levels_to_map(units, ladder, levels))
        return fitness(windows)

    work = Path(work_dir) if work_dir is not None else None
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
    times = {}
    tok0 = fitness.tokens_seen
    run_key = {"identity": identity, "slicing": slicing, "ladder": list(ladder), "units": units}  # keys every cache

    # 1. sensitivity (shared by every budget)
    t0 = time.time()
    sens = None
    if cfg.init == "sensitivity":
        meta = dict(run_key, windows=cfg.sens_windows)
        spath = work / f"sensitivity-{_key(meta)}.json" if work is not None else None
        sens = sensitivity_table(evaluate, n_units, n_levels, list(range(cfg.sens_windows)), spath, meta, progress)
    times["sensitivity_s"] = round(time.time() - t0, 1)

    # 2./3. evolution state
    skey = dict(run_key, cap=round(cap, 3), seed=cfg.seed, offspring=cfg.offspring, stages=list(cfg.stage_windows),
                survivors=list(cfg.survivors), max_mutations=cfg.max_mutations, init=cfg.init,
                sens_windows=cfg.sens_windows)
    state_path = work / f"search-{_key(skey)}.json" if work is not None else None
    state = None
    if state_path is not None and state_path.exists():
        st = json.loads(state_path.read_text())
        if st.get("key") == skey:
            state = st
            log(f"resuming search from {state_path} (generation {st['generation']})")
    final_windows = cfg.stage_windows[-1]

    t0 = time.time()
    if state is None:
        cands = {}
        if sens is not None:
            cands["sensitivity knapsack"] = knapsack(sens, costs, cap)
        for s in SCHEDULES:
            for fl in FLOORS:  # both floors: seeds for the search, duplicates are skipped below
                cands[f"{s} schedule (floor {fl})"] = map_to_levels(
                    units, ladder, schedule_map(cost, cap, s, ladder, cfg.granularity, fl))
        init_windows = list(range(final_windows))
        scored, seen = [], set()
        for name, lv in tqdm(cands.items(), desc="init candidates", disable=not progress, leave=False):
            if tuple(lv) in seen:
                continue
            seen.add(tuple(lv))
            scored.append((evaluate(lv, init_windows), name, lv))
        scored.sort(key=lambda x: x[0])
        init_kl, init_from, parent = scored[0]
        state = {"version": STATE_VERSION, "key": skey, "generation": 0, "levels": parent, "kl": init_kl,
                 "init_kl": init_kl, "init_from": init_from,
                 "init_scores": {n: k for k, n, _ in scored}, "history": []}
        log(f"start: {init_from} (KL {init_kl:.4f} on {final_windows} windows); others: "
            + ", ".join(f"{n} {k:.4f}" for k, n, _ in scored[1:]))
        if state_path is not None:
            atomic_write_json(state_path, state)
    times["init_s"] = round(time.time() - t0, 1)

    t0 = time.time()
    parent = list(state["levels"])
    bar = tqdm(total=cfg.generations, initial=min(state["generation"], cfg.generations), desc="evolution",
               disable=not progress, unit="gen")
    while state["generation"] < cfg.generations:
        g = state["generation"]
        rng = np.random.default_rng([cfg.seed, g])
        children, seen = [], {tuple(parent)}
        for _ in range(cfg.offspring * 10):
            if len(children) >= cfg.offspring:
                break
            n_steps = int(min(rng.integers(1, cfg.max_mutations + 1), rng.integers(1, cfg.max_mutations + 1)))
            c = mutate(parent, costs, cap, rng, n_steps)
            if c is not None and tuple(c) not in seen:
                seen.add(tuple(c))
                children.append(c)
        pool = children
        for s, n_win in enumerate(cfg.stage_windows):
            wins = sorted(rng.choice(n_pool, size=n_win, replace=False).tolist())
            last = s == len(cfg.stage_windows) - 1
            entrants = pool + ([parent] if last else [])  # the parent, last of the final stage, defends its place
            scores = sorted((evaluate(c, wins), i) for i, c in enumerate(entrants))
            if not last:
                pool = [entrants[i] for _, i in scores[: cfg.survivors[s]]]
        best_kl, bi = scores[0]
        parent_kl = next(k for k, i in scores if i == len(entrants) - 1)
        accepted = bi != len(entrants) - 1
        if accepted:
            parent = entrants[bi]
        state.update(generation=g + 1, levels=parent, kl=best_kl)
        state["history"].append({"generation": g + 1, "kl": round(best_kl, 6), "parent_kl": round(parent_kl, 6),
                                 "accepted": bool(accepted), "children": len(children)})
        if state_path is not None:
            atomic_write_json(state_path, state)
        bar.update(1)
        bar.set_postfix_str(f"KL {best_kl:.4f}{' *' if accepted else ''}")
    bar.close()
    times["evolution_s"] = round(time.time() - t0, 1)
    bits_map = levels_to_map(units, ladder, parent)
    set_bits(model, bits_map)
    return SearchResult(bits_map, parent, state["kl"], state["init_kl"], state["init_from"], state["history"],
                        times, fitness.tokens_seen - tok0)
