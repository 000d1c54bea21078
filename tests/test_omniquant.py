"""OmniQuant + MatQuant block-wise calibration on a tiny random Llama."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from matquant.algorithms import quantize_model
from matquant.algorithms.blocks import capture_block_inputs
from matquant.algorithms.training.lwc import BlockQuant, run_block
from matquant.algorithms.training.objective import build_objective
from matquant.format.checkpoint import load_checkpoint, save_checkpoint
from matquant.nn.bits import matquant_modules, set_bits


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def base():
    return tiny_llama()


@pytest.fixture(scope="module")
def calib():
    return torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))


def omni(model, calib, **kw):
    kw.setdefault("epochs", 2)
    kw.setdefault("group_size", 32)
    kw.setdefault("progress", False)
    return quantize_model(model, "omniquant", calib=calib, **kw)


def codes_of(model):
    return {n: (m.qweight.clone(), m.scales.clone(), m.zeros.clone()) for n, m in matquant_modules(model).items()}


def block0_out(model, calib):
    with torch.no_grad():
        return model(input_ids=calib, output_hidden_states=True).hidden_states[1]


# ---- spec parsing / bad input ----------------------------------------------------------------------------------
def test_distill_sources_paper_specs():
    """OmniQuant reads the shared objective (the one --distill parser): what each slice learns from, in order."""
    def sources(spec):
        obj = build_objective(distill=spec)
        return {r: list(obj.sources(r)) for r in obj.students}

    assert sources("[8,4,2]") == {8: ["fp"], 4: ["fp"], 2: ["fp"]}
    assert sources("[8,4,8->2]") == {8: ["fp"], 4: ["fp"], 2: [8]}
    assert sources("[8,4,2,8->2]") == {8: ["fp"], 4: ["fp"], 2: ["fp", 8]}
    assert sources("[8, 4, 2, 8→4;2]") == {8: ["fp"], 4: ["fp", 8], 2: ["fp", 8]}
    obj = build_objective(distill="[8,4,2,8->2]")
    assert obj.students == (8, 4, 2) and obj.lambdas == (0.1, 0.1, 1.0)
    assert build_objective([8, 4, 3, 2], [1, 1, 1, 2]).lambdas == (1, 1, 1, 2)
    assert build_objective(distill="[4,2,8->2]").needed() == (8, 4, 2)  # a teacher that is not trained


@pytest.mark.parametrize("kw, msg", [
    ({"distill": "[8,4,x]"}, "cannot read"),
    ({"distill": "[4->8]"}, "more bits"),
    ({"distill": "[]"}, "brackets"),
    ({"distill": "[8,4,2,8->2;2]"}, "more than one teacher"),
    ({"distill": "[9,4]"}, "1..8"),
    ({"bits_list": [8, 4, 2], "lambdas": [0.1, 1.0]}, "one λ per bit-width"),
    ({"bits_list": [8, 4, 2], "lambdas": [0.1, -1.0, 1.0]}, "positive"),
    ({"bits_list": [8, 4, 2], "lambdas": [0.0, 0.0, 0.0]}, "positive"),
    ({"bits_list": [8, 4, 4]}, "twice"),
    ({"bits_list": [8, 4, 2], "master_bits": 4}, "<= --bits-master"),
    ({"bits_list": [8, 2], "distill": "[8,4,2]"}, "disagree"),
    ({"block_inputs": "both"}, "block_inputs"),
    ({"lr": -1.0}, "--lr"),
    ({"loss_balance": "max"}, "--loss-balance"),
])
def test_bad_specs_fail_before_work(base, calib, kw, msg, tmp_path):
    model = copy.deepcopy(base)
    kw = dict(kw)
    master = kw.pop("master_bits", 8)
    with pytest.raises(ValueError, match=msg):
        omni(model, calib, master_bits=master, work_dir=str(tmp_path / "w"), **kw)
    assert not (tmp_path / "w").exists()  # nothing started
    assert not matquant_modules(model)


def test_cli_rejects_bad_spec_before_loading(tmp_path, capsys):
    from matquant.cli import main

    out = tmp_path / "never"
    rc = main(["quantize", "--model", "/nonexistent/model", "--out", str(out), "--method", "omniquant",
               "--distill", "[8,4,->2]"])
    assert rc == 1 and "cannot read" in capsys.readouterr().err and not out.exists()  # spec checked before loading


# ---- training ----------------------------------------------------------------------------------------------------
def test_lwc_reduces_block_error_vs_rtn(base, calib):
    ref = block0_out(base, calib)
    rtn_m, om = copy.deepcopy(base), copy.deepcopy(base)
    quantize_model(rtn_m, "rtn", group_size=32, progress=False, modules=r"model\.layers\.0\.mlp\..*")
    omni(om, calib, modules=r"model\.layers\.0\.mlp\..*", epochs=6, bits_list=[8, 4, 2])
    err = {}
    for r in (8, 4, 2):
        set_bits(rtn_m, r)
        set_bits(om, r)
        err[r] = [(block0_out(m, calib) - ref).pow(2).mean().item() for m in (rtn_m, om)]
    # the int2 slice (λ = 1) and the λ-weighted objective both improve on RTN
    assert err[2][1] < 0.95 * err[2][0], err
    lam = {8: 0.1, 4: 0.1, 2: 1.0}
    assert sum(lam[r] * e[1] for r, e in err.items()) < sum(lam[r] * e[0] for r, e in err.items()), err


def test_initial_loss_balance_protects_int8(base, calib):
    """Unbalanced, the int2 term dominates Σ λ_r·loss_r and the shared clipping shrinks toward int2, costing int8;
    'initial' weights each precision's relative improvement, so int8 (and int4) stay close to their MinMax error."""
    ref = block0_out(base, calib)
    err = {}
    for lb in ("none", "initial"):
        m = copy.deepcopy(base)
        omni(m, calib, modules=r"model\.layers\.0\.mlp\..*", epochs=6, bits_list=[8, 4, 2], loss_balance=lb)
        err[lb] = {}
        for r in (8, 4):
            set_bits(m, r)
            err[lb][r] = (block0_out(m, calib) - ref).pow(2).mean().item()
    assert err["initial"][8] < 0.5 * err["none"][8], err
    assert err["initial"][4] < err["none"][4], err


def test_let_folding_is_exact_without_quantization(base, calib):
    model = copy.deepcopy(base)
    block = model.model.layers[0]
    hidden, block_args = capture_block_inputs(model, calib[:2], "cpu")
    x, args = torch.stack(hidden), block_args[0]
    bq = BlockQuant(block, ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"], 8, 32, False, True,
                    block_x=(x, args))
    with torch.no_grad():
        for s in bq.let_scales:  # any positive scales
            s.mul_(torch.rand_like(s) + 0.5)
        w, over = bq.effective()
        params = dict(over, **{f"{t}.weight": w[t] for t in w})
        for i in range(2):
            torch.testing.assert_close(run_block(block, params, x[i], *args[i]), run_block(block, {}, x[i], *args[i]),
                                       rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kw", [
    {"distill": "[8,4,2,8->4;2]", "let": True},
    {"distill": "[8,4,8->2]", "block_inputs": "fp"},
    {"bits_list": [2]},                                  # Single-Precision MatQuant (int8 master)
    {"bits_list": [2], "master_bits": 2},                # dedicated int2 baseline
    {"bits_list": [8, 4, 3, 2], "slicing": "extra"},     # Extra-Precision
    {"bits_list": [4, 2], "symmetric": True},
    {"bits_list": [8, 4, 2], "loss_balance": "initial"},
])
def test_variants_run_and_store_valid_codes(base, calib, kw):
    model = copy.deepcopy(base)
    qcfg = omni(model, calib, epochs=1, **kw)
    c = kw.get("master_bits", 8)
    for m in matquant_modules(model).values():
        assert m.master_bits == c and int(m.qweight.max()) <= 2**c - 1
    set_bits(model, 2)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=calib[:1]).logits).all()
    if kw.get("slicing") == "extra":
        from matquant.nn.bits import effective_bits
        assert qcfg.slicing == "extra" and effective_bits(model) > 2.0


def test_resume_after_crash_is_identical(base, calib, tmp_path, capsys):
    full = copy.deepcopy(base)
    omni(full, calib, work_dir=str(tmp_path / "a"), distill="[8,4,2,8->2]")
    crashed = copy.deepcopy(base)
    with pytest.raises(RuntimeError, match="simulated crash after block 0"):
        omni(crashed, calib, work_dir=str(tmp_path / "b"), distill="[8,4,2,8->2]", _crash_after_block=0)
    assert sorted(p.name for p in (tmp_path / "b").glob("block_*")) == \
        ["block_000.safetensors"]
    resumed = copy.deepcopy(base)
    capsys.readouterr()
    omni(resumed, calib, work_dir=str(tmp_path / "b"), distill="[8,4,2,8->2]", progress=False)
    a, b = codes_of(full), codes_of(resumed)
    assert a.keys() == b.keys()
    for n in a:
        for x, y in zip(a[n], b[n]):
            assert torch.equal(x, y), n
    # a different setting in the same work dir is refused
    with pytest.raises(ValueError, match="different settings") as e:
        omni(copy.deepcopy(base), calib, work_dir=str(tmp_path / "b"), bits_list=[8, 2])
    assert "objective." in str(e.value) and len(str(e.value)) < 1000  # names what differs, briefly


def test_nan_loss_stops_and_keeps_finished_blocks(base, calib, tmp_path):
    model = copy.deepcopy(base)
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite loss .* block 1.*kept in .*--lr-lwc"):
        omni(model, calib, work_dir=str(tmp_path / "w"))
    assert sorted(p.name for p in (tmp_path / "w").glob("block_*")) == ["block_000.safetensors"]


def test_checkpoint_round_trip(base, calib, tmp_path):
    model = copy.deepcopy(base)
    qcfg = omni(model, calib, slicing="nested", let=True)
    save_checkpoint(model, None, tmp_path / "ckpt", qcfg)
    loaded, _, lcfg = load_checkpoint(tmp_path / "ckpt")
    assert lcfg.method == "omniquant" and lcfg.slicing == "nested"
    # LET changed the norms: they must be saved too
    torch.testing.assert_close(loaded.model.layers[0].post_attention_layernorm.weight,
                               model.model.layers[0].post_attention_layernorm.weight)
    for r in (8, 4, 2):
        set_bits(model, r)
        set_bits(loaded, r)
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=calib[:2]).logits, model(input_ids=calib[:2]).logits)
