"""Kill-anywhere, short: each command of lab/benchmarks/kill_anywhere.py is SIGKILLed at 2 random moments on a tiny
model, rerun, and compared with an uninterrupted run (the benchmark does 20 per command; docs/benchmarks.md)."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "lab" / "benchmarks"))
import kill_anywhere as ka  # noqa: E402


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    import matquant.cli  # noqa: F401  (forked children reuse the import)

    yield ka.setup(tmp_path_factory.mktemp("kill") / "fixtures")
    torch.set_num_threads(n)


@pytest.mark.parametrize("name", ka.COMMANDS)
def test_sigkill_then_rerun_gives_the_uninterrupted_result(env, name, tmp_path):
    ref, t_ref = ka.reference(name, env, tmp_path, small=True)
    rng = random.Random(name)
    # one kill early in the work, one at a random moment of the run (possibly after it finished)
    for k, delay in enumerate((rng.uniform(0.3, 0.6) * t_ref, rng.uniform(0, 1.2) * t_ref)):
        r = ka.trial(name, env, tmp_path / f"k{k}", delay, ref, small=True)
        assert not r["visible_problem"], r
        assert r["identical"], r
        assert r["lost_results"] == 0, r
        assert r["rerun_rc"] == 0 or r["note"], (r["rerun_rc"], r["rerun_error"])
