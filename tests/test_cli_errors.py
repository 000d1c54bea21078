"""CLI error handling: user-facing failures are one line and exit 2; a TypeError (a bug of ours) keeps its traceback."""
import pytest
import torch

import matquant.commands.info as info_cmd
from matquant.cli import main


def _run_raising(monkeypatch, capsys, exc):
    def boom(args):
        raise exc

    monkeypatch.setattr(info_cmd, "run", boom)
    monkeypatch.delenv("MATQUANT_DEBUG", raising=False)
    rc = main(["info", "somewhere"])
    err = capsys.readouterr().err
    return rc, err


@pytest.mark.parametrize("exc,expect", [
    (ModuleNotFoundError("No module named 'lm_eval'", name="lm_eval"), "pip install lm-eval"),
    (ModuleNotFoundError("No module named 'triton'", name="triton"), "pip install triton"),
    (FloatingPointError("non-finite loss (nan) in block 3: training diverged.\nTry --lr 1e-4"), "training diverged"),
    (RuntimeError("linalg.cholesky: The factorization could not be completed\nmore"), "cholesky"),
    (AssertionError("Torch not compiled with CUDA enabled"), "--device cpu"),
])
def test_user_facing_failures_are_one_line_exit_2(monkeypatch, capsys, exc, expect):
    rc, err = _run_raising(monkeypatch, capsys, exc)
    assert rc == 2
    assert expect in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_type_error_is_a_bug_and_keeps_its_traceback(monkeypatch, capsys):
    with pytest.raises(TypeError, match="unexpected keyword"):
        _run_raising(monkeypatch, capsys, TypeError("f() got an unexpected keyword argument 'x'"))


def test_our_own_broken_import_and_assertions_are_not_hidden(monkeypatch, capsys):
    with pytest.raises(ImportError):
        _run_raising(monkeypatch, capsys, ImportError("cannot import name 'x'", name="matquant.format"))
    with pytest.raises(AssertionError):
        _run_raising(monkeypatch, capsys, AssertionError("shapes differ"))


def test_debug_env_shows_the_traceback(monkeypatch, capsys):
    def boom(args):
        raise FloatingPointError("nan")

    monkeypatch.setattr(info_cmd, "run", boom)
    monkeypatch.setenv("MATQUANT_DEBUG", "1")
    with pytest.raises(FloatingPointError):
        main(["info", "somewhere"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch without a usable CUDA device")
def test_cuda_device_on_a_cpu_torch_is_one_line(tmp_path, capsys):
    rc = main(["eval", str(tmp_path / "ck"), "--device", "cuda"])
    err = capsys.readouterr().err
    assert rc == 2 and "--device cuda" in err and "--device cpu" in err
    assert len(err.strip().splitlines()) == 1


def test_bad_input_is_still_exit_1(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 1
    assert "not a folder" in capsys.readouterr().err
