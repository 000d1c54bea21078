"""Perplexity with the chunked loss (eval/perplexity.py) and evaluated one block at a time
(experiments/streamed_eval.py): the same value as the whole-logits / whole-model evaluation, for full-precision models
of several families and for matquant checkpoints at several precisions; bad input gives one clear error."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TEXT, tiny_model
from matquant.cli import main
from matquant.eval.perplexity import full_logits_perplexity, perplexity
from matquant.experiments.streamed_eval import open_eval_model, streamed_perplexity

FAMILIES = ["llama", "gemma2", "gpt2", "opt"]  # tied head; soft-capped logits + sliding window; other base models


def _windows(vocab: int = 320, n: int = 3, seqlen: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seqlen), generator=g)


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_loss_equals_whole_logits(family):
    model = tiny_model(family)
    w = _windows()
    ref = full_logits_perplexity(model, w, batch_size=2)
    for chunk_bytes in (1, 4 * 320 * 7, 2**30):  # one token per chunk, 7 tokens, everything at once
        got = perplexity(model, w, batch_size=2, progress=False, chunk_bytes=chunk_bytes)
        assert got.tokens == ref.tokens == 3 * 23
        assert got.nll == pytest.approx(ref.nll, rel=1e-6, abs=1e-6)


def test_chunked_loss_applies_the_soft_cap():
    model = tiny_model("gemma2")
    model.config.final_logit_softcapping = 0.05  # small enough to change this random model's logits
    w = _windows()
    capped = perplexity(model, w, progress=False, chunk_bytes=4 * 320 * 5).nll
    assert capped == pytest.approx(full_logits_perplexity(model, w).nll, abs=1e-6)
    model.config.final_logit_softcapping = None
    assert abs(perplexity(model, w, progress=False).nll - capped) > 1e-3  # the cap matters: it was applied


@pytest.fixture
def source_dir(tmp_path, tiny_tokenizer, request):
    model = tiny_model(request.param)
    d = tmp_path / request.param
    model.save_pretrained(d, max_shard_size="60KB")  # sharded: blocks read from several files
    tiny_tokenizer.save_pretrained(d)
    return d, model


@pytest.mark.parametrize("source_dir", FAMILIES, indirect=True)
def test_streamed_full_precision_equals_in_memory(source_dir, tmp_path):
    d, model = source_dir
    w = _windows()
    ref = perplexity(model, w, batch_size=2, progress=False)
    ev = open_eval_model(d)
    assert not ev.quantized and all(p.is_meta for p in ev.model.parameters())
    for cap in (None, 1):  # hidden states in memory; on disk from the first block on
        (got, eff), = streamed_perplexity(ev, w, batch_size=2, hidden_memory_bytes=cap, work_dir=tmp_path / "w",
                                          progress=False)
        assert eff is None and got.tokens == ref.tokens and got.windows == 3
        assert got.nll == pytest.approx(ref.nll, abs=1e-6)
    assert not any((tmp_path / "w").iterdir())  # the spilled states are removed


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """An RTN checkpoint (nested slicing, int8 master, slice-own int2 parameters) of a tiny untied Llama with 3
    blocks, sharded."""
    import transformers as T

    from conftest import TINY
    from _tiny import bpe_tokenizer

    d = tmp_path_factory.mktemp("ck")
    torch.manual_seed(1)
    m = T.LlamaForCausalLM(T.LlamaConfig(**{**TINY, "num_hidden_layers": 3}, tie_word_embeddings=False)).eval()
    m.save_pretrained(d / "src")
    bpe_tokenizer(320, 40).save_pretrained(d / "src")
    (d / "text.txt").write_text(TEXT)
    assert main(["quantize", "--method", "rtn", "--model", str(d / "src"), "--out", str(d / "ck"), "--group-size",
                 "32", "--slice-params", "own", "--calib-text", str(d / "text.txt"), "--calib-windows", "2",
                 "--calib-seqlen", "32", "--max-shard-size", "40KB"]) == 0
    return d


def test_streamed_checkpoint_equals_in_memory(checkpoint, tmp_path):
    from matquant.eval.grid import ppl_grid
    from matquant.format.checkpoint import load_checkpoint

    ck = checkpoint / "ck"
    assert (ck / "model.safetensors.index.json").exists()
    w = _windows(n=5)
    model, _, _ = load_checkpoint(ck)
    ref = ppl_grid(model, w, [8, 4, 2], ["nested", "paper"], bits_map={"model.layers.1.*": 2}, batch_size=2,
                   progress=False)
    slices = [(8, "nested"), (4, "nested"), (4, "paper"), (2, "nested"), (2, "paper"),
              ({"model.layers.1.*": 2}, "nested"), ({"model.layers.1.*": 2}, "paper")]
    ev = open_eval_model(ck)
    for cap in (None, 1):
        got = streamed_perplexity(ev, w, slices, batch_size=2, hidden_memory_bytes=cap, progress=False)
        assert len(got) == len(ref) == 7
        for r, (res, eff) in zip(ref, got):
            assert res.nll == pytest.approx(r["nll"], abs=1e-6), r
            assert eff == pytest.approx(r["effective_bits"], abs=1e-4)
    nlls = [res.nll for res, _ in got]
    assert len({round(x, 6) for x in nlls}) >= 5  # the slices differ: each ran at its own precision
    assert all(p.is_meta for n, p in ev.model.named_parameters() if ".layers." in n)  # blocks dropped again


def test_cli_stream_equals_in_memory_and_says_why(checkpoint, tmp_path, monkeypatch, capsys):
    import matquant.experiments.streamed_eval as streamed

    ck, common = checkpoint / "ck", ["--eval-text", str(checkpoint / "text.txt"), "--seqlen", "32", "--windows", "3"]
    rows = {}
    for how in ("--stream", "--in-memory"):
        out = tmp_path / f"{how}.json"
        assert main(["eval", str(ck), "--bits", "8,2", "--slicing", "nested,paper", *common, how, "--json",
                     str(out)]) == 0
        rows[how] = json.loads(out.read_text())
    assert [(r["bits"], r["slicing"]) for r in rows["--stream"]] == [(8, "any"), (2, "nested"), (2, "paper")]
    for a, b in zip(rows["--stream"], rows["--in-memory"]):
        assert (a["bits"], a["slicing"], a["tokens"]) == (b["bits"], b["slicing"], b["tokens"])
        assert a["nll"] == pytest.approx(b["nll"], abs=1e-6)
    capsys.readouterr()
    monkeypatch.setattr(streamed, "available_memory", lambda: 1000)  # the rule: too large -> streamed
    assert main(["eval", str(ck), "--bits", "4", *common]) == 0
    assert "evaluating one block at a time" in capsys.readouterr().out
    src = checkpoint / "src"  # a full-precision model: perplexity only, no --bits
    assert main(["eval", str(src), *common, "--json", str(tmp_path / "fp.json")]) == 0
    fp = json.loads((tmp_path / "fp.json").read_text())
    assert fp[0]["bits"] == 32 and fp[0]["ppl"] > 1


def test_bad_input_is_one_clear_error(checkpoint, tmp_path, capsys):
    ck, common = checkpoint / "ck", ["--eval-text", str(checkpoint / "text.txt"), "--seqlen", "32", "--windows", "2"]
    assert main(["eval", str(checkpoint / "src"), "--bits", "4", *common]) == 1
    assert "full-precision model" in capsys.readouterr().err
    assert main(["eval", str(ck), "--stream", "--tasks", "ppl,zeroshot", *common]) == 1
    assert "zero-shot evaluation needs the whole model" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing"), "--stream"]) == 1
    assert "not a folder" in capsys.readouterr().err
    ev = open_eval_model(ck)
    with pytest.raises(ValueError, match="2-D tensor"):
        streamed_perplexity(ev, torch.zeros(5, dtype=torch.long), progress=False)
    with pytest.raises(ValueError, match="1..8"):
        streamed_perplexity(ev, _windows(), [(9, "nested")], progress=False)
    # a corrupt block deep in the checkpoint: found when that block is read, one CheckpointError
    bad = tmp_path / "bad"
    import shutil

    shutil.copytree(ck, bad)
    index = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.2.mlp.down_proj.scales"
    f = bad / index[name]
    t = load_file(f)
    t[name] = torch.full_like(t[name], float("nan"))
    save_file(t, f, metadata={"format": "pt"})
    assert main(["eval", str(bad), "--bits", "4", "--stream", *common]) == 1
    err = capsys.readouterr().err
    assert "NaN/Inf" in err and name in err and "Traceback" not in err
