"""Integration tests on the embedded SmolLM2-135M (fp32 = the dequantized GGUF)."""
import json
import math

import pytest
import torch

import matquant
from matquant.algorithms import quantize_model
from matquant.data import token_windows
from matquant.eval import perplexity
from matquant.format.checkpoint import load_checkpoint, save_checkpoint

pytestmark = pytest.mark.real_model


def test_real_model_round_trip_and_int8_perplexity(real_model, tmp_path):
    import copy

    fp_model, tok = real_model
    model = copy.deepcopy(fp_model)
    windows = token_windows(tok, "eval", 512, 2)
    ref = perplexity(model, windows, progress=False).ppl
    qcfg = quantize_model(model, "rtn", master_bits=8, group_size=64, scope="ffn", progress=False)
    assert len(qcfg.modules) == 90
    int8 = perplexity(model, windows, progress=False).ppl
    assert abs(int8 / ref - 1) < 0.01, (int8, ref)  # int8 slice within 1% of fp32
    matquant.set_bits(model, 2, "nested")
    int2 = perplexity(model, windows, progress=False).ppl
    assert int2 > int8  # lower precision really is in use

    d = tmp_path / "ck"
    save_checkpoint(model, tok, d, qcfg)
    loaded, tok2, q = load_checkpoint(d, bits=4, slicing="nested")
    matquant.set_bits(model, 4, "nested")
    x = windows[:1, :64]
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(d)
    matquant.set_bits(hf, 4, "nested")
    with torch.no_grad():
        assert torch.equal(hf(x).logits, model(x).logits)
    size = (d / "model.safetensors").stat().st_size
    fp_size = sum(t.numel() * 4 for t in fp_model.state_dict().values()) - fp_model.lm_head.weight.numel() * 4
    assert size < 0.65 * fp_size  # FFN codes are 1 byte instead of 4


def test_demo_command_end_to_end(tmp_path):
    from matquant.cli import main

    out = tmp_path / "demo"
    # the default recipe (quality) on two blocks' FFN layers: every step of the demo, in CI time
    assert main(["demo", "--out", str(out), "--windows", "1", "--seqlen", "128", "--bits", "8,4,2",
                 "--calib-windows", "2", "--calib-seqlen", "128", "--modules", r"model\.layers\.[01]\.mlp\..*"]) == 0
    res = json.loads((out / "results.json").read_text())
    rows = {(r["method"], r["bits"], r["slicing"]): r["ppl"] for r in res["rows"]}
    assert res["qconfig"]["method_args"] == {"clip": "weighted", "slice_params": "own"}  # the default: quality
    for b in (8, 4, 2):  # every slice of the one checkpoint, nested slicing (the default) below int8
        mode = "nested" if b < 8 else "any"
        assert math.isfinite(rows[("matgptq int8 sliced", b, mode)]) and rows[("matgptq int8 sliced", b, mode)] > 1
    assert not any(k[2] == "paper" for k in rows)  # --modes paper,nested adds the paper rows
    for b in (4, 2):  # the dedicated per-bit RTN baselines: present, finite, and models of their own
        ppl = rows[("rtn int%d dedicated" % b, b, "-")]
        assert math.isfinite(ppl) and ppl > 1
        assert ppl != rows[("matgptq int8 sliced", b, "nested")]
    assert (out / "ppl_vs_bits.png").stat().st_size > 10_000
    assert (out / "checkpoint" / "model.safetensors").exists()
