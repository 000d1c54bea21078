"""Budget accounting, budget parsing, bits-map validation, fixed schedules at a budget (tiny models)."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from _mixnmatch_tiny import make_dirs, quantized_tiny
from matquant.mixnmatch import SCHEDULES, CostModel, group_units, parse_budget, schedule_map, validate_bits_map
from matquant.mixnmatch.levels import knapsack, mutate
from matquant.nn import effective_bits, set_bits


def test_parse_budget():
    assert parse_budget("3.0").kind == "bits" and parse_budget("3.0").value == 3.0
    assert parse_budget(2.5).value == 2.5
    b = parse_budget("45MB")
    assert (b.kind, b.value) == ("bytes", 45e6)
    assert parse_budget("0.1GiB").value == pytest.approx(0.1 * 2**30)
    assert parse_budget("12 kib").value == 12 * 1024
    for bad, msg in [("abc", "cannot read"), ("0", r"\(0, 8\]"), ("9", r"\(0, 8\]"), ("3x", "unknown unit"),
                     ("", "cannot read")]:
        with pytest.raises(ValueError, match=msg):
            parse_budget(bad)


@pytest.mark.parametrize("slicing", ["paper", "nested", "extra"])
def test_cost_matches_module_effective_bits(slicing):
    _, q, _ = quantized_tiny(layers=2, scope="ffn+attn")
    cost = CostModel.from_model(q, slicing, ladder=(2, 3, 4, 8))
    names = cost.names
    bmap = {n: (2, 3, 4, 8)[i % 4] for i, n in enumerate(names)}
    set_bits(q, bmap, slicing)
    assert cost.effective_bits(bmap) == pytest.approx(effective_bits(q), rel=1e-6)
    if slicing != "extra":
        assert cost.average_bits(cost.uniform(3)) == 3.0
    # effective = code bits + fp16 scale and zero per group of 32 (+ nothing else: no biases in Llama)
    if slicing != "extra":
        assert cost.effective_bits(cost.uniform(4)) == pytest.approx(4 + 32 / 32)


def test_extra_overflow_is_counted():
    _, q, _ = quantized_tiny(layers=2)
    cost = CostModel.from_model(q, "extra", ladder=(2, 3))
    assert any(v > 0 for v in cost.overflow.values())
    assert cost.average_bits(cost.uniform(2)) > 2.0


def test_total_bytes_and_checkpoint_header(tmp_path):
    _, ckpt, _ = make_dirs(tmp_path, layers=2)
    from matquant.format.checkpoint import load_checkpoint

    model, _, _ = load_checkpoint(ckpt)
    a = CostModel.from_checkpoint(ckpt)
    b = CostModel.from_model(model)
    assert a.numel == b.numel and a.param_bits == b.param_bits
    assert a.unquantized_bytes == b.unquantized_bytes
    m8 = a.uniform(8)
    weights = sum(a.numel.values())
    params = sum(a.param_bits.values()) // 8
    assert a.total_bytes(m8) == weights + params + a.unquantized_bytes
    assert a.total_bytes(a.uniform(4)) == weights // 2 + params + a.unquantized_bytes
    # the stored file holds int8 codes: its size is the all-int8 total plus the safetensors header
    size = (ckpt / "model.safetensors").stat().st_size
    assert 0 < size - a.total_bytes(m8) < 20_000


def test_budget_range_errors():
    _, q, _ = quantized_tiny(layers=2)
    cost = CostModel.from_model(q)
    assert cost.code_bits_cap(parse_budget("3"), 2) == 3 * cost.total_weights
    with pytest.raises(ValueError, match="below the smallest configuration"):
        cost.code_bits_cap(parse_budget("2.5"), 3)
    lo = cost.total_bytes(cost.uniform(2))
    hi = cost.total_bytes(cost.uniform(8))
    with pytest.raises(ValueError, match="below the smallest"):
        cost.code_bits_cap(parse_budget(f"{lo - 1}B"), 2)
    with pytest.raises(ValueError, match="above every layer at int8"):
        cost.code_bits_cap(parse_budget(f"{hi + 1}B"), 2)
    cap = cost.code_bits_cap(parse_budget(f"{cost.total_bytes(cost.uniform(4))}B"), 2)
    assert cap == pytest.approx(4 * cost.total_weights)


def test_validate_bits_map():
    mods = [f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")]
    assert validate_bits_map({"model.layers.0.*": 4}, mods) == {m: 4 for m in mods[:3]}
    with pytest.raises(ValueError, match="match no quantized module"):
        validate_bits_map({"model.layers.7.mlp.up_proj": 4}, mods)
    for bad in (0, 9, 3.5, True):
        with pytest.raises(ValueError, match="1..8"):
            validate_bits_map({mods[0]: bad}, mods)
    with pytest.raises(ValueError, match="master bits"):
        validate_bits_map({mods[0]: 6}, mods, master_bits=4)
    with pytest.raises(ValueError, match="non-empty"):
        validate_bits_map({}, mods)


def test_group_units():
    names = [f"model.layers.{i}.{p}" for i in (0, 1, 10, 2) for p in ("self_attn.q_proj", "mlp.down_proj")]
    units = group_units(names, "layer")
    assert [u[0].split(".")[2] for u in units] == ["0", "1", "2", "10"] and all(len(u) == 2 for u in units)
    assert len(group_units(names, "module")) == 8
    with pytest.raises(ValueError, match="granularity"):
        group_units(names, "block")


@pytest.mark.parametrize("granularity", ["layer", "module"])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_map_fits_budget(schedule, granularity):
    _, q, _ = quantized_tiny(layers=6, scope="ffn+attn")
    cost = CostModel.from_model(q)
    for target in (2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0):
        cap = cost.code_bits_cap(parse_budget(str(target)), 2)
        m = schedule_map(cost, cap, schedule, (2, 3, 4, 6, 8), granularity)
        assert set(m) == set(cost.names)
        assert cost.average_bits(m) <= target + 1e-9
        assert cost.average_bits(m) >= target - 2.0  # uses (most of) the budget
        if granularity == "layer":  # a block's modules share their bits
            for u in group_units(cost.names, "layer"):
                assert len({m[n] for n in u}) == 1


def test_pyramid_shape_at_layer_granularity():
    _, q, _ = quantized_tiny(layers=9)
    cost = CostModel.from_model(q)
    m = schedule_map(cost, 4.0 * cost.total_weights, "pyramid")
    per_layer = [m[f"model.layers.{i}.mlp.up_proj"] for i in range(9)]
    assert per_layer[4] == max(per_layer) and per_layer[0] == min(per_layer) == per_layer[-1]


def test_knapsack_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(30):
        n, L = 4, 3
        costs = np.sort(rng.integers(1, 6, size=(n, L)), axis=1).astype(float) * rng.integers(1, 3, size=(n, 1))
        sens = np.sort(rng.random((n, L)), axis=1)[:, ::-1] * 10  # more bits -> less KL
        cap = float(costs[:, 0].sum() + rng.integers(0, int(costs[:, -1].sum() - costs[:, 0].sum()) + 1))
        lv = knapsack(sens, costs, cap)
        assert sum(costs[u, l] for u, l in enumerate(lv)) <= cap + 1e-9
        best = min(sum(sens[u, l] for u, l in enumerate(c)) for c in itertools.product(range(L), repeat=n)
                   if sum(costs[u, l] for u, l in enumerate(c)) <= cap)
        got = sum(sens[u, l] for u, l in enumerate(lv))
        assert got == pytest.approx(best)  # exact on integer costs
    with pytest.raises(ValueError):
        knapsack(np.zeros((2, 2)), np.ones((2, 2)), 1.0)


def test_mutations_keep_the_budget():
    rng = np.random.default_rng(1)
    ladder = np.array([2, 3, 4, 6, 8], dtype=float)
    sizes = np.array([1, 1, 3, 8, 8, 3, 1, 1], dtype=float)
    costs = sizes[:, None] * ladder[None, :]
    cap = 3.3 * sizes.sum()
    levels = knapsack(-costs, costs, cap)  # any feasible start
    for _ in range(300):
        child = mutate(levels, costs, cap, rng, int(rng.integers(1, 4)))
        if child is None:
            continue
        assert sum(costs[u, l] for u, l in enumerate(child)) <= cap + 1e-6
        assert all(0 <= l < 5 for l in child)
        levels = child
    assert math.isfinite(sum(levels))
