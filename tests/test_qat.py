"""QAT + MatQuant on a tiny Llama: loss decreases, exact resume (in-process crash and SIGKILL), NaN stop,
checkpoint round trip, 2-process gloo DDP (torchrun; FSDP: tests/test_qat_fsdp.py)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from matquant.algorithms import quantize_model
from matquant.algorithms.training.diverged import TrainingDiverged
from matquant.algorithms.training.objective import build_objective
from matquant.algorithms.training.qat_config import lr_at, make_config, sample_indices
from matquant.algorithms.training.qat_loop import latest_checkpoint, train_qat
from matquant.eval.perplexity import perplexity
from matquant.format.checkpoint import load_checkpoint, save_checkpoint
from matquant.models.targets import find_targets
from matquant.nn.bits import set_bits

sys.path.insert(0, str(Path(__file__).parent))
from qat_worker import structured_windows, tiny_llama, tiny_model_dir  # noqa: E402

WORKER = Path(__file__).parent / "qat_worker.py"
SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 shared cores: more threads only add contention for these tiny models
    yield
    torch.set_num_threads(n)


def _train(work_dir=None, steps=6, cb=None, distill="[8,4,2,8->2]", dropout=0.1, **kw):
    model = tiny_llama(0, dropout=dropout)
    cfg = make_config(steps=steps, lr=kw.pop("lr", 5e-3), save_every=kw.pop("save_every", 2), work_dir=work_dir,
                      device="cpu", **kw)
    # paper slicing, explicitly (build_objective's default is DEFAULT_SLICING): the torchrun test compares training
    # "up to float summation order", which nested slicing's floor boundaries amplify past its tolerance
    obj = build_objective(distill=distill, slicing="paper")
    return train_qat(model, find_targets(model), structured_windows(), obj, cfg,
                     group_size=32, symmetric=False, param_dtype=torch.float16, progress=False, step_callback=cb)


def test_schedule_and_data_order():
    cfg = make_config(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(cfg, 0) == pytest.approx(0.1) and lr_at(cfg, 9) == pytest.approx(1.0)
    assert lr_at(cfg, 10) == pytest.approx(1.0) and lr_at(cfg, 99) == pytest.approx(0.1, abs=1e-3)
    a = sample_indices(5, 0, 0, 10)
    assert sorted(a[:5]) == list(range(5)) and sorted(a[5:]) == list(range(5))  # each epoch is a permutation
    assert sample_indices(5, 0, 3, 4) == a[3:7]  # a pure function of the position: resume needs no state


def test_loss_decreases():
    res = _train(steps=60, lr=1e-2, save_every=0, dropout=0.0)
    for key in ("loss", "loss_int8", "loss_int4", "loss_int2"):
        first = sum(h[key] for h in res.history[:5]) / 5
        last = sum(h[key] for h in res.history[-5:]) / 5
        assert last < first - 0.3, (key, first, last)  # uniform guessing: ln 256 = 5.55 nats
    assert all(math.isfinite(h["loss"]) for h in res.history)


def test_resume_after_crash_is_exact(tmp_path):
    ref = _train(tmp_path / "a", steps=7, grad_accum=2)

    def crash(step, _m):
        if step == 5:
            raise KeyboardInterrupt("simulated kill after step 5")

    with pytest.raises(KeyboardInterrupt):
        _train(tmp_path / "b", steps=7, grad_accum=2, cb=crash)
    assert latest_checkpoint(tmp_path / "b").name == "step-00000004.safetensors"  # saved every 2 steps
    res = _train(tmp_path / "b", steps=7, grad_accum=2)  # "rerun the same command"
    assert res.resumed_from == 4
    assert res.history == ref.history
    for n in ref.weights:
        assert torch.equal(res.weights[n], ref.weights[n]), n
        assert torch.equal(res.qweights[n].codes, ref.qweights[n].codes)
        assert torch.equal(res.qweights[n].scales, ref.qweights[n].scales)
    # a finished run resumes to the same result without training
    again = _train(tmp_path / "b", steps=7, grad_accum=2)
    assert again.resumed_from == 7 and all(torch.equal(again.weights[n], ref.weights[n]) for n in ref.weights)
    # different settings never resume from that folder
    with pytest.raises(ValueError, match="different settings"):
        _train(tmp_path / "b", steps=7, grad_accum=2, lr=1e-3)


def test_sigkill_then_rerun_matches_uninterrupted(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(WORKER), "--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "w"),
           "--steps", "6", "--save-every", "2", "--grad-accum", "2"]
    killed = subprocess.run(cmd + ["--kill-at", "3"], env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    assert latest_checkpoint(tmp_path / "w").name == "step-00000002.safetensors"
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out" / "rank0.json").read_text())["resumed_from"] == 2
    ref = _train(None, steps=6, grad_accum=2)
    got = load_file(str(tmp_path / "out" / "rank0.safetensors"))
    for n in ref.weights:
        assert torch.equal(got[f"{n}.weight"], ref.weights[n]), n
        assert torch.equal(got[f"{n}.codes"], ref.qweights[n].codes), n


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    def poison(step, model):
        if step == 3:
            with torch.no_grad():
                model.model.norm.weight.fill_(float("nan"))

    with pytest.raises(TrainingDiverged, match=r"non-finite loss .* step 4 .*last good checkpoint \(step 3\).*--lr"):
        _train(tmp_path / "w", steps=6, save_every=1, cb=poison)
    ck = latest_checkpoint(tmp_path / "w")
    assert ck.name == "step-00000003.safetensors"
    assert all(torch.isfinite(t).all() for k, t in load_file(str(ck)).items() if k.startswith("param/"))


def test_quantize_model_checkpoint_round_trip(tmp_path):
    model = tiny_llama(0)
    calib = structured_windows()
    ev = structured_windows(4, 32, seed=7)
    before = perplexity(model, ev, progress=False).ppl
    qcfg = quantize_model(model, "qat", master_bits=8, group_size=32, slicing="nested", calib=calib, progress=False,
                          bits_list="8,4,2", lambdas="0.1,0.1,1", steps=30, lr=1e-2, save_every=0,
                          work_dir=str(tmp_path / "w"), device="cpu")
    assert qcfg.method == "qat" and qcfg.method_args["bits_list"] == "8,4,2" and qcfg.slicing == "nested"
    save_checkpoint(model, None, tmp_path / "ck", qcfg)
    loaded, _, lcfg = load_checkpoint(tmp_path / "ck")
    for b in (8, 4, 2):
        set_bits(model, b)
        set_bits(loaded, b)
        p1, p2 = perplexity(model, ev, progress=False).ppl, perplexity(loaded, ev, progress=False).ppl
        assert p1 == pytest.approx(p2, rel=1e-6)
        if b == 8:
            assert p1 < before  # training on the (learnable) structured text helps the held-out windows too
    sd, lsd = model.state_dict(), loaded.state_dict()
    assert all(torch.equal(sd[k], lsd[k]) for k in sd if k.endswith("qweight"))


def test_torchrun_two_process_gloo_matches_single_process(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           str(WORKER), "--out", str(tmp_path / "out"), "--steps", "5", "--batch", "1", "--save-every", "2",
           "--work-dir", str(tmp_path / "w"), "--dropout", "0", "--shard", "ddp",
           "--activation-checkpointing"]  # (recomputing the blocks' activations changes nothing: same bounds)
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    r0, r1 = (load_file(str(tmp_path / "out" / f"rank{k}.safetensors")) for k in (0, 1))
    assert json.loads((tmp_path / "out" / "rank1.json").read_text())["world"] == 2
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)  # ranks stay in lock-step
    # the same global batch (2 windows) in one process: same training up to float summation order
    ref = _train(None, steps=5, batch_size=2, dropout=0.0)
    h = json.loads((tmp_path / "out" / "rank0.json").read_text())["history"]
    assert [x["loss"] for x in h] == pytest.approx([x["loss"] for x in ref.history], rel=1e-4)
    for n, w in ref.weights.items():
        assert torch.allclose(r0[f"{n}.weight"], w, atol=1e-5), n
        moved = (r0[f"{n}.weight"] - tiny_llama(0).get_submodule(n).weight).abs().max()
        assert moved > 1e-3  # it did train


@pytest.mark.parametrize("mode", ["paper", "nested", "extra"])
@pytest.mark.parametrize("bits", [8, 4, 3, 2])
def test_lean_ste_equals_fake_quant_ste(mode, bits):
    from matquant.algorithms.training.fake_quant import SlicedMinMaxSTE
    from matquant.quant.minmax import minmax_params
    from matquant.quant.ste import fake_quant_ste

    torch.manual_seed(bits)
    w = torch.randn(16, 64) * 0.05
    s, z = minmax_params(w, 8, 32)
    s, z = s.half().float(), z.half().float()  # storage-dtype rounding: some codes land on the clamps
    g = torch.randn(16, 64)
    w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
    y1 = fake_quant_ste(w1, s, z, 8, bits, mode)
    y2 = SlicedMinMaxSTE.apply(w2, s, z, 8, bits, mode)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    assert torch.equal(y1, y2)
    assert torch.allclose(w1.grad, w2.grad, rtol=1e-6, atol=1e-7)


def test_minmax_qparams_follow_optimizer_updates():
    from matquant.algorithms.training.fake_quant import FakeQuantLinear

    m = FakeQuantLinear(torch.randn(8, 32), None, 32, 8, False, torch.float16, "minmax", "paper")
    z0 = m.qparams()[1].clone()
    opt = torch.optim.AdamW([m.weight], lr=0.1)
    m.weight.grad = torch.ones_like(m.weight)
    opt.step()
    assert not torch.equal(m.qparams()[1], z0)


def test_cli_quantize_qat_under_torchrun(tmp_path):
    """The user-facing command, 2 processes (gloo): every rank trains, rank 0 writes one loadable checkpoint."""
    model_dir = tiny_model_dir(tmp_path / "m")
    text = tmp_path / "train.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "ck"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29518",
           "-m", "matquant", "quantize", "--model", str(model_dir), "--method", "qat", "--calib-text", str(text),
           "--calib-seqlen", "32", "--calib-windows", "8", "--group-size", "32", "--steps", "3", "--save-every", "2",
           "--distill", "[8,4,8->2]", "--slicing", "nested", "--train-device", "cpu", "--out", str(out),
           "--keep-work-dir"]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    model, _, qcfg = load_checkpoint(out, bits=2)
    assert qcfg.method == "qat" and qcfg.slicing == "nested" and qcfg.method_args["distill"] == "[8,4,8->2]"
    assert latest_checkpoint(tmp_path / "ck.qat-work").name == "step-00000003.safetensors"
    assert math.isfinite(perplexity(model, structured_windows(2, 32, vocab=97), progress=False).ppl)


def test_cli_default_work_dir_is_removed_after_success_named_one_kept(tmp_path, capsys):
    from matquant.cli import main

    model_dir = tiny_model_dir(tmp_path / "m")
    text = tmp_path / "train.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    common = ["quantize", "--model", str(model_dir), "--method", "qat", "--calib-text", str(text), "--calib-seqlen",
              "32", "--calib-windows", "4", "--group-size", "32", "--steps", "2", "--train-device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "config.json").exists() and not (tmp_path / "a.qat-work").exists()
    assert "removed the training state" in capsys.readouterr().out
    assert main([*common, "--out", str(tmp_path / "b"), "--work-dir", str(tmp_path / "mine")]) == 0
    assert latest_checkpoint(tmp_path / "mine") is not None and "kept in" in capsys.readouterr().out


def test_learnable_qparams_train_every_slice():
    """--qparams learnable with a weight-sized lr: the scale moves in log space, so int2 improves like minmax's.
    (Raw scales of ~1e-4 moved by 100x per AdamW step: int2 stayed at the untrained perplexity.)"""
    ev = structured_windows(4, 32, seed=7)
    got = {}
    for qp in ("minmax", "learnable"):
        model = tiny_llama(0)
        before = perplexity(model, ev, progress=False).ppl
        quantize_model(model, "qat", master_bits=8, group_size=32, slicing="nested", calib=structured_windows(),
                       progress=False, bits_list="8,4,2", lambdas="0.1,0.1,1", steps=30, lr=1e-2, save_every=0,
                       qparams=qp, work_dir=None, device="cpu")
        set_bits(model, 2)
        got[qp] = perplexity(model, ev, progress=False).ppl
    assert got["learnable"] < 0.9 * before, got
    assert got["learnable"] < 1.15 * got["minmax"], got
