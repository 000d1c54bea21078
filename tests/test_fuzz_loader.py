"""The CI slice of lab/benchmarks/fuzz_loader.py: two thousand mutants of a real tiny checkpoint (single-file and
sharded), every outcome success or a one-line CheckpointError (the long run's figures are in docs/benchmarks.md)."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
N_INPUTS = 2000  # the issue asks CI for "a few thousand"; ~2-3 min on 2 cores (from_pretrained on every 10th)
ALLOWED = {"ok", "ok-plain-model", "checkpoint-error", "transformers-config", "cli-error"}


def _fuzz():
    spec = importlib.util.spec_from_file_location("fuzz_loader", ROOT / "lab" / "benchmarks" / "fuzz_loader.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_harness_tells_crashes_from_clean_errors():
    fz = _fuzz()
    from matquant.format.config import CheckpointError

    def raise_(e):
        raise e

    assert fz._classify(lambda: raise_(CheckpointError("bad tensor")), hf=False)[0] == "checkpoint-error"
    assert fz._classify(lambda: raise_(CheckpointError("two\nlines")), hf=False)[0].startswith("crash")
    assert fz._classify(lambda: raise_(RuntimeError("boom")), hf=False)[0] == "crash:RuntimeError"
    assert fz._classify(lambda: raise_(KeyError("x")), hf=True)[0] == "transformers-config"  # matquant never ran


def test_transformers_errors_on_a_matquant_folder_are_crashes(tmp_path):
    fz = _fuzz()
    seed = fz.build_seed(tmp_path / "seed")

    def boom():
        raise RecursionError("inside transformers")

    # the folder is recognisably matquant, so the pre-check ran: an error past it is ours to fix
    assert fz._classify(boom, hf=True, folder=seed)[0] == "crash:transformers-on-matquant-folder-RecursionError"
    assert fz._classify(boom, hf=True, folder=tmp_path)[0] == "transformers-config"  # no matquant mark left


def test_mutations_are_reproducible_from_the_seed(tmp_path):
    fz = _fuzz()
    seed = fz.build_seed(tmp_path / "seed")
    a, b = tmp_path / "a", tmp_path / "b"
    layouts = set()
    for i in range(20):
        muts = fz.mutate(seed, a, i)
        layouts.add((a / fz.INDEX).exists() and not (a / fz.WEIGHTS).exists() or "sharded seed" in muts)
        assert fz.mutate(seed, b, i) == muts
        for f in sorted(p.name for p in a.iterdir() if p.is_file() and not p.is_symlink()):
            assert (a / f).read_bytes() == (b / f).read_bytes()
    assert layouts == {True, False}  # both layouts are drawn


def test_sharded_mutations_reach_the_index_checks(tmp_path):
    import random
    import shutil

    import matquant

    fz = _fuzz()
    fz.build_seed(tmp_path / "seed")
    outcomes = []
    for i in range(40):
        d = tmp_path / "m"
        if d.exists():
            shutil.rmtree(d)
        shutil.copytree(tmp_path / fz.SHARDED_SEED, d)
        fz._TARGET["weights"] = fz._shards(d)[0]
        (fz.mut_index if i % 2 else fz.mut_shards)(d, random.Random(i))
        outcomes.append(fz._classify(lambda: matquant.load(d), hf=False)[0])
    assert set(outcomes) <= {"ok", "checkpoint-error"}, outcomes
    assert outcomes.count("checkpoint-error") > 25  # nearly every index/shard mutation is refused


def test_fuzz_slice_has_no_crash(tmp_path):
    out = tmp_path / "summary.json"
    rc = _fuzz().main(["--inputs", str(N_INPUTS), "--seed", "7", "--hf-every", "10", "--eval-every", "0", "--stream-every", "10", "--nice", "0",
                       "--work", str(tmp_path / "work"), "--out", str(out)])
    s = json.loads(out.read_text())
    assert s["inputs"] == N_INPUTS
    assert s["crash_count"] == 0, json.dumps(s["crashes"], indent=1)[:3000]
    assert rc == 0
    for target, outcomes in s["outcomes"].items():
        assert set(outcomes) <= ALLOWED, (target, outcomes)
    assert s["outcomes"]["load"].get("checkpoint-error", 0) > N_INPUTS // 3  # the mutants do reach the checks
    assert s["outcomes"]["load"].get("ok", 0) > N_INPUTS // 30  # and harmless ones still load
