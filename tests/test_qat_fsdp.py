"""QAT sharded with FSDP2 under torchrun (2 processes, gloo, CPU) on the tiny Llama of tests/qat_worker.py:
the same training as one process, resume after a crash, activation checkpointing, the CLI's checkpoint,
and the clear errors (FSDP without torchrun, a batch the processes cannot split, a model without checkpointing).

Tolerance of "the same training": the 2-process run computes the same global batch, so it differs from one
process only in float summation order (each rank averages its window's gradient, then FSDP's reduce-scatter
averages the ranks; the losses are all-reduced). Measured: losses within 1e-7 relative, weights within 2e-6
absolute after 5 AdamW steps at lr 5e-3; the bounds below (1e-4, 1e-5, the DDP test's) leave 5x margin and stay
far below one update (5e-3); the int8 codes may differ by one step where a weight lies that close to a rounding
boundary (none did here; at most 0.1 % allowed).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from matquant.algorithms.training.objective import build_objective
from matquant.algorithms.training.qat_config import make_config, per_process_batch
from matquant.algorithms.training.qat_loop import latest_checkpoint, train_qat
from matquant.models.targets import find_targets

sys.path.insert(0, str(Path(__file__).parent))
from qat_worker import structured_windows, tiny_llama, tiny_model_dir  # noqa: E402

WORKER = Path(__file__).parent / "qat_worker.py"
SRC = Path(__file__).resolve().parents[1] / "src"
ENV = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}


def torchrun(port: int, *args, timeout=180):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port), *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def single_process(steps: int, **kw):
    torch.set_num_threads(1)
    model = tiny_llama(0)
    cfg = make_config(steps=steps, lr=5e-3, save_every=0, work_dir=None, device="cpu", **kw)
    obj = build_objective(None, None, "[8,4,2,8->2]", slicing="paper")  # as qat_worker.py
    return train_qat(model, find_targets(model), structured_windows(), obj, cfg, group_size=32, symmetric=False,
                     param_dtype=torch.float16, progress=False)


CLI = ["quantize", "--method", "qat", "--calib-seqlen", "32", "--calib-windows", "8", "--group-size", "32",
       "--steps", "3", "--global-batch", "2", "--distill", "[8,4,8->2]", "--slicing", "paper", "--train-device", "cpu"]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """One torchrun start (2 processes, --shard fsdp): the worker's training (every rank crashes after step 3, the
    rerun in the same processes resumes from step 2 with activation checkpointing), then the CLI on an HF folder."""
    tmp = tmp_path_factory.mktemp("fsdp")
    model_dir = tiny_model_dir(tmp / "m")
    text = tmp / "train.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    cli = [*CLI, "--model", str(model_dir), "--calib-text", str(text)]
    r = torchrun(29531, str(WORKER), "--out", str(tmp / "out"), "--work-dir", str(tmp / "w"), "--steps", "5",
                 "--save-every", "2", "--dropout", "0", "--shard", "fsdp", "--global-batch", "2", "--crash-at", "3",
                 "--activation-checkpointing", "--then-cli",
                 json.dumps([*cli, "--shard", "fsdp", "--activation-checkpointing", "--out", str(tmp / "fsdp")]))
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, cli


def test_fsdp_two_processes_crash_resume_match_single_process(fsdp_run):
    tmp, _ = fsdp_run
    out, work = tmp / "out", tmp / "w"
    r0, r1 = (load_file(str(out / f"rank{k}.safetensors")) for k in (0, 1))
    info = json.loads((out / "rank0.json").read_text())
    assert info["world"] == 2 and info["resumed_from"] == 2
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)  # every rank gathers the same
    ref = single_process(5, batch_size=2)  # the same global batch (2 windows) in one process
    assert [h["loss"] for h in info["history"]] == pytest.approx([h["loss"] for h in ref.history], rel=1e-4)
    flips = total = 0
    for n, w in ref.weights.items():
        assert torch.allclose(r0[f"{n}.weight"], w, atol=1e-5), n
        assert (r0[f"{n}.weight"] - tiny_llama(0).get_submodule(n).weight).abs().max() > 1e-3  # it did train
        diff = (r0[f"{n}.codes"].int() - ref.qweights[n].codes.int()).abs()
        assert diff.max() <= 1, n
        flips, total = flips + int((diff > 0).sum()), total + diff.numel()
    assert flips <= total // 1000
    # the training state holds whole tensors whatever the sharding (rank 0 wrote it from the gathered shards)
    st = load_file(str(latest_checkpoint(work)))
    w0 = "model.layers.0.mlp.up_proj"
    assert torch.equal(st[f"param/{w0}.weight"], r0[f"{w0}.weight"])
    assert st["opt/0/exp_avg"].shape == ref.weights["model.layers.0.mlp.gate_proj"].shape


def test_cli_quantize_qat_fsdp_writes_the_same_checkpoint(fsdp_run, tmp_path):
    from matquant.cli import main
    from matquant.format.checkpoint import load_checkpoint

    tmp, cli = fsdp_run
    torch.set_num_threads(1)
    assert main([*cli, "--out", str(tmp_path / "one")]) == 0  # the same command in one process
    a, _, qa = load_checkpoint(tmp / "fsdp")
    b, _, qb = load_checkpoint(tmp_path / "one")
    assert qa.to_dict() == qb.to_dict()  # same format and recorded options (--shard is how it ran, not what)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if k.endswith("qweight") or "codes" in k:
            assert (sa[k].int() - sb[k].int()).abs().max() <= 1, k
        elif sa[k].is_floating_point():
            assert torch.allclose(sa[k].float(), sb[k].float(), rtol=1e-3, atol=1e-5), k
        else:
            assert torch.equal(sa[k], sb[k]), k


def test_clear_errors():
    with pytest.raises(ValueError, match="--shard fsdp needs several processes: start it with torchrun"):
        single_process(1, shard="fsdp")
    with pytest.raises(ValueError, match="--shard must be one of ddp, fsdp"):
        single_process(1, shard="zero3")
    with pytest.raises(ValueError, match=r"--global-batch 3 is not divisible by 2 process\(es\) x --grad-accum 1"):
        per_process_batch(make_config(global_batch=3), 2)
    assert per_process_batch(make_config(global_batch=8, grad_accum=2), 2) == 2
    assert single_process(1, global_batch=2).tokens == 2 * 32  # one process: the whole global batch
    with pytest.raises(ValueError, match="not both"):
        make_config(global_batch=2, batch_size=2)
    model = tiny_llama(0)
    model.supports_gradient_checkpointing = False
    cfg = make_config(steps=1, device="cpu", activation_checkpointing=True)
    with pytest.raises(ValueError, match="LlamaForCausalLM does not support gradient checkpointing.*run without "
                                         "--activation-checkpointing"):
        train_qat(model, find_targets(model), structured_windows(), build_objective(None, None, "[8,4,2]"), cfg,
                  group_size=32, symmetric=False, param_dtype=torch.float16, progress=False)


def test_activation_checkpointing_one_process_is_exact():
    """Recomputing the blocks' activations changes nothing (same ops in the same order), and is switched off after."""
    ref = single_process(3, batch_size=2)
    model = tiny_llama(0)
    cfg = make_config(steps=3, lr=5e-3, save_every=0, device="cpu", batch_size=2, activation_checkpointing=True)
    got = train_qat(model, find_targets(model), structured_windows(),
                    build_objective(None, None, "[8,4,2,8->2]", slicing="paper"), cfg, group_size=32,
                    symmetric=False, param_dtype=torch.float16, progress=False)
    assert got.history == ref.history
    assert all(torch.equal(got.weights[n], ref.weights[n]) for n in ref.weights)
    assert not model.is_activation_checkpointing
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # nothing left behind
