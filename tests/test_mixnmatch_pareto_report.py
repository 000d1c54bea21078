"""The Mix'n'Match benchmark's report: per-budget summary and plot from stored rows (no model needed)."""
import importlib.util
import os

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _mod():
    spec = importlib.util.spec_from_file_location("mixnmatch_pareto",
                                                  os.path.join(ROOT, "lab", "benchmarks", "mixnmatch_pareto.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(kind, label, budget, ppl, bits=None):
    return {"kind": kind, "label": label, "budget": budget, "mode": "nested", "ppl": ppl,
            "average_bits": bits if bits is not None else budget, "effective_bits": budget + 0.5}


ROWS = [_row("uniform", "int3", 3.0, 50.0), _row("schedule", "uniform", 3.0, 50.0),
        _row("schedule", "pyramid", 3.0, 300.0), _row("schedule", "pyramid/min", 3.0, 20.0),
        _row("search", "search", 3.0, 40.0), _row("schedule", "decreasing", 3.5, 30.0, 3.49),
        _row("schedule", "uniform", 3.5, 35.0), _row("uniform", "int8", 8.0, 20.0)]


def test_summary_compares_search_with_best_other_map():
    text = _mod().summary(ROWS, fp32=20.0)
    line3 = next(ln for ln in text.splitlines() if ln.startswith("| 3 |"))
    # uniform int3 2.5x; best fixed schedule with the default floor is 'uniform' (the /min variant is not a default
    # schedule, but it is a measured map: the search (2.0x) is compared against it too -> +100 %)
    assert "2.5×" in line3 and "uniform 2.5×" in line3 and "| 2× |" in line3 and "+100.0 %" in line3
    line35 = next(ln for ln in text.splitlines() if ln.startswith("| 3.5 |"))
    assert "decreasing 1.5×" in line35 and line35.rstrip().endswith("| — | — |")  # no search at 3.5
    assert not any(ln.startswith("| 8 |") for ln in text.splitlines())  # uniform-only budgets are not summarised


def test_plot_writes_png_with_clipped_points(tmp_path):
    out = tmp_path / "p.png"
    _mod().plot(ROWS + [_row("uniform", "int2", 2.0, 1e6)], 20.0, out, {"scope": "ffn", "method": "rtn"})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
