"""The research bench's two machine settings (lab/benchmarks/_paths.py): the work folder and llama.cpp's binaries;
and no script under lab/ defaults to one machine's paths."""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

LAB = Path(__file__).resolve().parents[1] / "lab"


@pytest.fixture()
def paths(monkeypatch):
    monkeypatch.delenv("MATQUANT_WORK", raising=False)
    monkeypatch.delenv("MATQUANT_LLAMA_CPP", raising=False)
    spec = importlib.util.spec_from_file_location("_lab_paths", LAB / "benchmarks" / "_paths.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_work_folder_option_then_environment_then_default(paths, monkeypatch):
    assert paths.work_dir() == Path("matquant-work")
    monkeypatch.setenv("MATQUANT_WORK", "/somewhere")
    assert paths.work_dir() == Path("/somewhere")
    assert paths.work_dir("elsewhere") == Path("elsewhere")
    assert paths.work_path("export", "results.jsonl") == Path("/somewhere/export/results.jsonl")


def test_llama_cpp_binaries_from_the_setting_or_path(paths, monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(paths.LlamaCppNotFound, match="PATH.*MATQUANT_LLAMA_CPP"):
        paths.llama_tool("llama-bench")
    tool = tmp_path / "bin" / "llama-bench"
    tool.parent.mkdir()
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tool.parent))
    assert paths.llama_tool("llama-bench") == tool
    monkeypatch.setenv("MATQUANT_LLAMA_CPP", str(tmp_path))  # set: its folder only, with an error naming both
    with pytest.raises(paths.LlamaCppNotFound, match="MATQUANT_LLAMA_CPP.*PATH"):
        paths.llama_tool("llama-bench")
    monkeypatch.setenv("MATQUANT_LLAMA_CPP", str(tool.parent))
    assert paths.llama_tool("llama-bench") == tool


def test_no_lab_script_holds_a_machine_path():
    machine = re.compile(r"""["'`\s=](/work/|/root/|/home/|/tmp/|/Users/)|llama_cpp_python-""")
    files = sorted(p for ext in ("*.py", "*.yaml", "*.md") for p in LAB.rglob(ext))
    bad = [f"{p.relative_to(LAB)}:{i}" for p in files
           for i, line in enumerate(p.read_text().splitlines(), 1) if machine.search(line)]
    assert not bad, bad
