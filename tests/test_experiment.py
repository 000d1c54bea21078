"""Experiment grid runner, results store, report (tiny local model; zero-shot replaced by a fake evaluator)."""
from __future__ import annotations

import json
import textwrap

import pytest
from _evaltiny import save_tiny_source

from matquant.experiments.grid import GridError, load_grid, parse_grid
from matquant.eval.plot import pareto
from matquant.experiments.report import build_tables, update_marked_section, write_report
from matquant.experiments.runner import Evaluators, run_grid
from matquant.experiments.store import ResultStore, config_key

TEXT = ("The quick brown fox jumps over the lazy dog. " * 60)


class FakeZeroShot(Evaluators):
    """Real perplexity, deterministic fake zero-shot numbers (lm-eval itself is tested in test_zeroshot.py)."""

    def __init__(self, fail_at: int | None = None):
        self.calls = 0
        self.fail_at = fail_at

    def _tick(self):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise KeyboardInterrupt

    def ppl(self, model, tok, settings):
        self._tick()
        return super().ppl(model, tok, settings)

    def zeroshot(self, model, tok, settings, cache):
        self._tick()
        tasks = {t: {"acc": .5, "acc_norm": .25, "n": 3, "metric": "acc", "score": .5} for t in settings["tasks"]}
        return {"tasks": tasks, "average": .5, "limit": settings["limit"], "seconds": 0.0}


@pytest.fixture
def grid_file(tmp_path):
    src = save_tiny_source(tmp_path / "src")
    (tmp_path / "text.txt").write_text(TEXT)
    g = tmp_path / "grid.yaml"
    g.write_text(textwrap.dedent(f"""
        name: tiny
        out: {tmp_path / 'out'}
        docs: {tmp_path / 'docs' / 'results.md'}
        models: [{src}]
        methods: [rtn]
        scopes: [ffn]
        slicing: [paper, nested]
        bits: [8, 4, 2]
        group_size: 32
        mixnmatch: [{{schedule: pyramid, target: 5.0, ladder: [2, 4, 8]}}]
        eval:
          ppl: {{text: {tmp_path / 'text.txt'}, windows: 2, seqlen: 64}}
          zeroshot: {{tasks: [arc_easy, piqa], limit: 3}}
    """))
    return g


def test_grid_expansion_and_keys(grid_file):
    g = load_grid(grid_file)
    assert len(g.jobs) == 3  # fp32 + rtn × 2 slicings
    n = sum(len(j.evals) for j in g.jobs)
    assert n == 2 + 2 * (3 + 1) * 2  # fp32 (ppl, zs) + 2 slicings × (3 bits + 1 M&M) × 2 evals
    keys = {config_key(c) for j in g.jobs for c in j.evals}
    assert len(keys) == n  # every measurement distinct
    c = g.jobs[1].evals[0]
    assert c["quant"]["method"] == "rtn" and c["quant"]["group_size"] == 32 and "batch_size" not in c


def test_method_entry_may_be_a_dedicated_model():
    """{master_bits, bits} on a method entry: a dedicated int4 model beside the sliced int8 one, same store."""
    g = parse_grid({"methods": ["rtn", {"name": "rtn", "label": "rtn4", "master_bits": 4, "bits": [4]},
                                {"name": "rtn", "label": "rtn3", "master_bits": 3}],
                    "slicing": ["nested"], "bits": [8, 4, 3]})
    got = {j.quant["label"]: (j.quant["master_bits"], [c["bits"] for c in j.evals]) for j in g.jobs[1:]}
    assert got == {"rtn": (8, [8, 4, 3]), "rtn4": (4, [4]), "rtn3": (3, [3])}  # default bits: the grid's <= master


def test_method_entry_calibration_overrides_the_grid_and_rtn_gets_it_when_it_reads_it():
    g = parse_grid({"methods": [{"name": "gptq", "calib": {"windows": 8, "seqlen": 256, "offset": 32}}, "gptq", "rtn",
                                {"name": "rtn", "label": "rtn own", "args": {"slice_params": "own"}}],
                    "slicing": ["nested"], "calib": {"windows": 4}})
    got = {j.quant["label"] + str(i): j.quant.get("calib") for i, j in enumerate(g.jobs[1:])}
    assert got == {"gptq0": {"text": "calib", "windows": 8, "seqlen": 256, "offset": 32},
                   "gptq1": {"text": "calib", "windows": 4, "seqlen": 512},  # the method's default seqlen
                   "rtn2": None, "rtn own3": {"text": "calib", "windows": 4, "seqlen": 512}}


@pytest.mark.parametrize("bad, msg", [
    ({"colour": 1}, "unknown grid key"),
    ({"methods": [{"name": "gptq", "calib": {"window": 8}}]}, "calib must map some of"),
    ({"calib": {"offsets": 8}}, r"calib has unknown key\(s\) \['offsets'\]"),
    ({"methods": [{"name": "gptq", "calib": {"offset": -1}}]}, "calib offset must be a non-negative integer"),
    ({"methods": ["nosuch"]}, "unknown method 'nosuch'; registered: "),
    ({"slicing": ["weird"]}, "unknown slicing 'weird'"),
    ({"bits": [9]}, "outside 1..master_bits"),
    ({"eval": {"zeroshot": {"tasks": ["mmlu"]}}}, r"unknown zero-shot task\(s\) \['mmlu'\]"),
    ({"eval": {"bleu": {}}}, "eval must map"),
    ({"mixnmatch": [{"schedule": "zigzag", "target": 3}]}, "unknown Mix'n'Match schedule"),
    ({"mixnmatch": [{"schedule": "pyramid", "target": 3, "floor": 4}]}, "above the target"),
    ({"mixnmatch": [{"schedule": "pyramid", "target": 3, "flor": 2}]}, r"unknown key\(s\) \['flor'\]"),
    ({"methods": [{"name": "rtn", "master_bits": 4, "bits": [6]}]}, r"'rtn': bits \[6\] are outside 1..master_bits \(4\)"),
    ({"methods": [{"name": "rtn", "bit": [4]}]}, r"unknown key\(s\) \['bit'\]"),
])
def test_grid_errors(bad, msg):
    with pytest.raises((GridError, ValueError), match=msg):
        parse_grid(bad)


def test_missing_grid_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_grid(tmp_path / "none.yaml")


def test_run_interrupt_resume_no_result_lost(grid_file, tmp_path):
    g = load_grid(grid_file)
    total = sum(len(j.evals) for j in g.jobs)
    with pytest.raises(KeyboardInterrupt):
        run_grid(g, FakeZeroShot(fail_at=6), log=lambda s: None)
    store = ResultStore(g.store)
    first = store.records()
    assert len(first) == 5  # everything finished before the interrupt is stored
    ev = FakeZeroShot()
    s = run_grid(g, ev, log=lambda s: None)
    assert s == {**s, "total": total, "skipped": 5, "measured": total - 5}
    assert ev.calls == total - 5  # nothing measured twice
    recs = store.records()
    assert len(recs) == total and recs[:5] == first  # earlier lines untouched
    assert len({r["key"] for r in recs}) == total
    r = recs[-1]
    assert {"key", "config", "result", "code_version", "started", "seconds", "host"} <= set(r)
    assert r["code_version"].startswith("0.1.0")
    ppl = {(r["config"]["quant"] or {}).get("slicing", "fp32"): r for r in recs
           if r["config"]["eval"] == "ppl" and r["config"]["bits"] in (2, "fp32")}
    assert ppl["paper"]["result"]["ppl"] > 0 and ppl["fp32"]["result"]["effective_bits"] == 32.0
    mnm = [r for r in recs if isinstance(r["config"]["bits"], dict)]
    assert mnm and all(2 < r["result"]["effective_bits"] < 8 for r in mnm)
    # a third run measures nothing
    ev3 = FakeZeroShot()
    assert run_grid(g, ev3, log=lambda s: None)["measured"] == 0 and ev3.calls == 0


def test_report_tables_plots_docs(grid_file):
    g = load_grid(grid_file)
    run_grid(g, FakeZeroShot(), log=lambda s: None)
    assert (g.out / "results.md").exists() and (g.out / "ppl_vs_bits.png").stat().st_size > 1000
    assert (g.out / "zeroshot_vs_bits.png").exists()
    md = (g.out / "results.md").read_text()
    assert "perplexity (lower is better)" in md and "| rtn [ffn, nested] |" in md and "M&M pyramid@5" in md
    assert "first 3 questions per task" in md and "**50.0** / 25.0" in md
    import re

    rtn = next(line for line in md.splitlines() if line.startswith("| rtn [ffn, nested] |"))
    ref = float(re.search(r"\| fp32 \| ([0-9.]+) \(1\.000×\)", md).group(1))
    ppl, rel = map(float, re.search(r"\| ([0-9.]+) \(([0-9.]+)×\)", rtn).groups())  # each cell ÷ the fp32 row
    assert rel == pytest.approx(ppl / ref, abs=1e-3) and "| quantize s |" in md
    docs = g.docs.read_text()
    assert docs.count("matquant-experiment tiny: begin") == 1
    write_report(ResultStore(g.store), g.out, name="tiny", docs=g.docs)  # regenerating replaces the section
    assert g.docs.read_text().count("matquant-experiment tiny: begin") == 1


def test_torn_last_line_is_skipped_and_not_fatal(tmp_path):
    s = ResultStore(tmp_path / "r.jsonl")
    s.append({"a": 1}, {"x": 1}, seconds=1)
    with open(s.path, "a") as f:
        f.write('{"key": "abc", "config": {"a"')  # crash mid-write
    with pytest.warns(UserWarning, match="torn by a crash"):
        assert len(s.records()) == 1
    s.append({"a": 2}, {"x": 2}, seconds=1)
    with pytest.warns(UserWarning):
        recs = s.records()
    assert [r["config"]["a"] for r in recs] == [1, 2]
    assert s.done({"a": 2}) and not s.done({"a": 3})


def test_pareto():
    pts = [(2, 10.0), (3, 5.0), (4, 6.0), (8, 4.0), (8, 4.5)]
    assert pareto(pts, higher_is_better=False) == [(2, 10.0), (3, 5.0), (8, 4.0)]
    assert pareto([(2, 30), (4, 50), (6, 45), (8, 55)], higher_is_better=True) == [(2, 30), (4, 50), (8, 55)]


def test_marked_section_keeps_other_text(tmp_path):
    p = tmp_path / "r.md"
    p.write_text("# Results\n\nhand-written\n")
    update_marked_section(p, "g", "table 1")
    update_marked_section(p, "g", "table 2")
    t = p.read_text()
    assert "hand-written" in t and "table 2" in t and "table 1" not in t


def test_checkpoint_with_other_tokenizer_is_refused_results_kept(grid_file, tmp_path):
    from _evaltiny import byte_tokenizer, tiny_llama

    from matquant.algorithms import quantize_model
    from matquant.format.checkpoint import save_checkpoint

    tok = byte_tokenizer(extra=3)  # a different tokenizer than the grid model's
    m = tiny_llama(vocab_size=len(tok))
    save_checkpoint(m, tok, tmp_path / "ck", quantize_model(m, "rtn", group_size=32, progress=False))
    raw = grid_file.read_text() + f"checkpoints: [{tmp_path / 'ck'}]\n"
    grid_file.write_text(raw)
    g = load_grid(grid_file)
    with pytest.raises(ValueError, match="differs from the one evaluation expects"):
        run_grid(g, FakeZeroShot(), log=lambda s: None)
    assert len(ResultStore(g.store).records()) == sum(len(j.evals) for j in g.jobs[:-2])


def test_cli_experiment_and_report(grid_file, capsys, monkeypatch):
    from matquant.cli import main

    g = load_grid(grid_file)
    assert main(["experiment", str(grid_file), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.count("todo ") == sum(len(j.evals) for j in g.jobs)
    run_grid(g, FakeZeroShot(), log=lambda s: None, report=False)
    assert main(["report", str(g.out)]) == 0
    out = capsys.readouterr().out
    assert "zero-shot task average" in out and "| fp32 |" in out
    assert main(["report", str(g.out / "nope.jsonl")]) == 1
    assert "does not exist" in capsys.readouterr().err
    recs = ResultStore(g.store).records()
    assert build_tables(recs) == build_tables(recs + recs[:2])  # duplicates of a key: the last one wins
    assert json.loads(g.store.read_text().splitlines()[0])["key"] == recs[0]["key"]


def test_report_skips_foreign_records(tmp_path, capsys):
    from matquant.cli import main

    s = ResultStore(tmp_path / "r.jsonl")
    s.append({"model": "m", "method": "fp32"}, {"x": 1}, seconds=1)  # e.g. written by a benchmark script
    assert main(["report", str(s.path)]) == 0
    assert "1 record(s) not written by `matquant experiment` were skipped" in capsys.readouterr().out
