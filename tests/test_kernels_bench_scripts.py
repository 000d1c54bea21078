"""The GPU benchmark script imports and says clearly that it needs CUDA on a machine without it."""
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA; the script would run for real")
def test_gpu_bench_needs_cuda_message():
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    r = subprocess.run([sys.executable, os.path.join(ROOT, "lab", "benchmarks", "bench_kernels_gpu.py")], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "needs CUDA" in r.stderr and "--dry-run-cpu" in r.stderr


def test_gpu_bench_bad_shape_is_clear_error(capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_kernels_gpu", os.path.join(ROOT, "lab", "benchmarks",
                                                                                    "bench_kernels_gpu.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    with pytest.raises(SystemExit) as e:
        mod.build_parser().parse_args(["--shapes", "4096"])
    assert e.value.code == 2 and "OUTxIN" in capsys.readouterr().err
    assert mod.build_parser().parse_args(["--shapes", "14336x4096"]).shapes == [(14336, 4096)]
