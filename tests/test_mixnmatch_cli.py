"""`matquant mixnmatch` end to end on a tiny Llama checkpoint: schedules, search, --apply, eval, bad input."""
from __future__ import annotations

import json

import pytest

from _mixnmatch_tiny import make_dirs
from matquant.cli import main


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return make_dirs(tmp_path_factory.mktemp("mnm"), layers=3)


def test_schedule_out_apply_and_eval(dirs, tmp_path, capsys):
    ref, ckpt, text = dirs
    out = tmp_path / "bits.json"
    assert main(["mixnmatch", str(ckpt), "--budget", "3.5", "--schedule", "pyramid", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["average_bits"] <= 3.5 and set(doc["bits_map"].values()) <= {2, 3, 4, 6, 8}
    assert doc["method"] == "pyramid schedule" and doc["effective_bits"] > doc["average_bits"]
    assert doc["floor"] == "auto" and min(doc["bits_map"].values()) == 3  # the ladder value just below 3.5
    low = tmp_path / "low.json"
    assert main(["mixnmatch", str(ckpt), "--budget", "3.5", "--schedule", "pyramid", "--floor", "min",
                 "--out", str(low)]) == 0
    assert min(json.loads(low.read_text())["bits_map"].values()) == 2
    # eval takes the output format directly ({"bits_map": ...} with metadata)
    rows = tmp_path / "rows.json"
    assert main(["eval", str(ckpt), "--bits", "8", "--bits-map", str(out), "--eval-text", str(text), "--seqlen", "32",
                 "--windows", "2", "--slicing", "paper", "--json", str(rows)]) == 0
    got = json.loads(rows.read_text())
    assert any(r["bits"] == "map" for r in got)
    # --apply stores the map in config.json, and a load starts at it; weights untouched
    before = (ckpt / "model.safetensors").read_bytes()
    assert main(["mixnmatch", str(ckpt), "--bits-map", str(out), "--apply"]) == 0
    cfg = json.loads((ckpt / "config.json").read_text())
    assert cfg["quantization_config"]["bits_map"] == doc["bits_map"]
    assert (ckpt / "model.safetensors").read_bytes() == before
    from matquant import get_bits, load

    model, _ = load(str(ckpt))
    assert get_bits(model) == doc["bits_map"]


def test_search_cli_and_bytes_budget(dirs, tmp_path):
    ref, ckpt, text = dirs
    from matquant.mixnmatch import CostModel

    cost = CostModel.from_checkpoint(ckpt)
    size = cost.total_bytes(cost.uniform(3))
    out = tmp_path / "s.json"
    argv = ["mixnmatch", str(ckpt), "--budget", f"{size}B", "--reference", str(ref), "--calib-text", str(text),
            "--calib-seqlen", "32", "--calib-windows", "4", "--generations", "1", "--offspring", "2",
            "--stage-windows", "1,2", "--survivors", "1", "--work-dir", str(tmp_path / "w"), "--out", str(out),
            "--no-progress"]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["method"] == "search" and doc["total_bytes"] <= size
    assert doc["search"]["generations"] == 1 and doc["search"]["calib_text"] == str(text)
    assert list((tmp_path / "w").glob("reference-top128.safetensors"))
    assert main(argv) == 0  # second run: reference cached, search state resumed (already complete)
    assert json.loads(out.read_text())["bits_map"] == doc["bits_map"]


@pytest.mark.parametrize("argv_tail, msg", [
    (["--budget", "1.5"], "below the smallest configuration"),
    (["--budget", "1GiB"], "above every layer at int8"),
    (["--budget", "9"], r"\(0, 8\]"),
    (["--budget", "2.9", "--ladder", "3,4"], "below the smallest"),
    (["--budget", "3", "--calib-text", "eval"], "evaluation text"),
    (["--budget", "3", "--stage-windows", "1,64", "--survivors", "2"], "calib-windows"),
    ([], "pass --budget"),
    (["--budget", "3", "--schedule", "pyramid", "--floor", "5"], "not on the ladder"),
    (["--budget", "3", "--schedule", "pyramid", "--floor", "4"], "above the target"),
])
def test_bad_input(dirs, capsys, argv_tail, msg):
    _, ckpt, _ = dirs
    assert main(["mixnmatch", str(ckpt), *argv_tail]) == 1
    import re

    assert re.search(msg, capsys.readouterr().err)


@pytest.mark.parametrize("bits_map, msg", [
    ({"model.layers.9.mlp.up_proj": 4}, "match no quantized module"),
    ({"model.layers.0.mlp.up_proj": 9}, "1..8"),
    ({"model.layers.0.mlp.up_proj": 0}, "1..8"),
    ({"model.layers.*": 8}, "does not fit the budget"),
])
def test_bad_bits_map(dirs, tmp_path, capsys, bits_map, msg):
    _, ckpt, _ = dirs
    p = tmp_path / "m.json"
    p.write_text(json.dumps(bits_map))
    before = (ckpt / "config.json").read_text()
    assert main(["mixnmatch", str(ckpt), "--bits-map", str(p), "--budget", "3", "--apply"]) == 1
    assert msg in capsys.readouterr().err or __import__("re").search(msg, capsys.readouterr().err)
    assert (ckpt / "config.json").read_text() == before  # nothing written
