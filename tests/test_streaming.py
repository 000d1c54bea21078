"""The streaming pipeline (algorithms/streaming.py): one decoder block at a time from a sharded source, the same
checkpoint tensors as the in-memory pipeline, sharded output, resume after a kill."""
import json

import pytest
import torch

from conftest import tiny_model
from matquant.algorithms import Calibration, resolve_config
from matquant.algorithms.pipeline import quantize
from matquant.format.shards import INDEX_NAME, TensorReader

CAL = Calibration(windows=3, seqlen=32)


@pytest.fixture
def sharded_src(tmp_path, tiny_tokenizer):
    """A tiny 3-block Llama saved as several safetensors shards with an index (untied head)."""
    import transformers as T

    from conftest import TINY

    torch.manual_seed(1)
    m = T.LlamaForCausalLM(T.LlamaConfig(**{**TINY, "num_hidden_layers": 3}, tie_word_embeddings=False)).eval()
    d = tmp_path / "src"
    m.save_pretrained(d, max_shard_size="60KB")
    tiny_tokenizer.save_pretrained(d)
    assert (d / INDEX_NAME).exists()
    return d


def same_checkpoint(a, b):
    A, B = TensorReader(a), TensorReader(b)
    assert sorted(A.names()) == sorted(B.names())
    for n in A.names():
        x, y = A.get(n), B.get(n)
        assert x.dtype == y.dtype and torch.equal(x, y), n
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (a, b))
    assert ca == cb


@pytest.mark.parametrize("method,recipe,opts", [
    ("rtn", None, {}),
    (None, "quality", {}),
    ("gptq", None, {"act_order": True}),
    ("rtn", None, {"clip": "weighted", "slice_params": "own", "slicing": "paper"}),
    ("omniquant", None, {"epochs": 1, "slice_params": "own"}),
])
def test_streamed_checkpoint_equals_in_memory(sharded_src, tmp_path, method, recipe, opts):
    config = resolve_config(method, recipe, **opts)
    quantize(str(sharded_src), config, out=tmp_path / "s", calib=CAL, stream=True, progress=False, log=lambda *_: 0)
    quantize(str(sharded_src), config, out=tmp_path / "m", calib=CAL, stream=False, progress=False, log=lambda *_: 0)
    same_checkpoint(tmp_path / "s", tmp_path / "m")
    assert not (tmp_path / "s.stream-work").exists()


def test_sharded_output_loads_like_single_file(sharded_src, tmp_path):
    config = resolve_config("rtn", None)
    quantize(str(sharded_src), config, out=tmp_path / "one", stream=True, progress=False, log=lambda *_: 0)
    quantize(str(sharded_src), config, out=tmp_path / "many", stream=True, progress=False, log=lambda *_: 0,
             max_shard_bytes=40_000)
    index = json.loads((tmp_path / "many" / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in
                                                  map(TensorReader(tmp_path / "many").get, index["weight_map"]))
    same_checkpoint(tmp_path / "one", tmp_path / "many")


@pytest.mark.parametrize("calib_memory", [None, 1])
def test_kill_mid_pass_then_rerun_resumes_identically(sharded_src, tmp_path, monkeypatch, calib_memory):
    """Killed after block 1, rerun: the same checkpoint as an uninterrupted in-memory run; with calib_memory=1
    byte every block's hidden states are kept on disk (and the resume point only names their folder)."""
    from matquant.algorithms import streaming

    config = resolve_config("gptq", None)
    real = streaming.BlockStream.save_resume_point
    calls = []

    def dying(self, pass_no, next_block, hidden):
        real(self, pass_no, next_block, hidden)
        calls.append(next_block)
        if next_block == 2:
            raise KeyboardInterrupt  # stands in for a kill right after block 1 was finished
    monkeypatch.setattr(streaming.BlockStream, "save_resume_point", dying)
    with pytest.raises(KeyboardInterrupt):
        quantize(str(sharded_src), config, out=tmp_path / "s", calib=CAL, stream=True, progress=False,
                 log=lambda *_: 0, calib_memory_bytes=calib_memory)
    if calib_memory:
        assert list((tmp_path / "s.stream-work").glob("pass-1-states-*/0.safetensors"))
    assert not (tmp_path / "s").exists() and (tmp_path / "s.stream-work").exists()
    monkeypatch.setattr(streaming.BlockStream, "save_resume_point", real)
    seen = []
    quantize(str(sharded_src), config, out=tmp_path / "s", calib=CAL, stream=True, progress=False, log=seen.append,
             calib_memory_bytes=calib_memory)
    assert any("resuming" in str(m) for m in seen)
    quantize(str(sharded_src), config, out=tmp_path / "m", calib=CAL, stream=False, progress=False, log=lambda *_: 0)
    same_checkpoint(tmp_path / "s", tmp_path / "m")


def test_stale_work_folder_of_other_settings_is_discarded(sharded_src, tmp_path):
    work = tmp_path / "s.stream-work"
    work.mkdir()
    (work / "settings.json").write_text('{"method": "something else"}')
    seen = []
    quantize(str(sharded_src), resolve_config("rtn", None), out=tmp_path / "s", stream=True, progress=False,
             log=seen.append)
    assert any("discarding" in str(m) for m in seen) and not work.exists()


def test_configs_that_cannot_stream_load_the_whole_model(sharded_src, tmp_path):
    config = resolve_config("rtn", None, rotate="input")
    seen = []
    quantize(str(sharded_src), config, out=tmp_path / "r", progress=False, log=seen.append)
    assert any("loading the whole model" in str(m) for m in seen)
    with pytest.raises(ValueError, match="cannot quantize .* streamed: --rotate input"):
        quantize(str(sharded_src), config, out=tmp_path / "r2", stream=True, progress=False, log=lambda *_: 0)
    with pytest.raises(ValueError, match="stream=True needs a model path"):
        quantize(tiny_model("llama"), config, out=tmp_path / "r3", stream=True)


def test_cli_streams_by_default_and_in_memory_on_request(sharded_src, tmp_path, capsys):
    from matquant.cli import main

    assert main(["quantize", "--method", "rtn", "--model", str(sharded_src), "--out", str(tmp_path / "a"),
                 "--max-shard-size", "50KB"]) == 0
    assert "streamed" in capsys.readouterr().out
    assert (tmp_path / "a" / INDEX_NAME).exists()
    assert main(["quantize", "--method", "rtn", "--model", str(sharded_src), "--out", str(tmp_path / "b"),
                 "--in-memory"]) == 0
    assert "streamed" not in capsys.readouterr().out
    same_checkpoint(tmp_path / "a", tmp_path / "b")


def test_streamed_gpt2_reads_position_embeddings(tmp_path, tiny_tokenizer):
    """A model with parameters besides the token embedding before block 0 (GPT-2's position embeddings `wpe`):
    the skeleton reads them, and the streamed checkpoint equals the in-memory one."""
    import transformers as T

    torch.manual_seed(2)
    m = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=tiny_tokenizer.vocab_size + 8, n_embd=64, n_layer=2, n_head=4,
                                       n_positions=64)).eval()
    m.save_pretrained(tmp_path / "src")
    tiny_tokenizer.save_pretrained(tmp_path / "src")
    config = resolve_config("gptq", None)
    for out, stream in (("s", True), ("m", False)):
        quantize(str(tmp_path / "src"), config, out=tmp_path / out, calib=CAL, stream=stream, progress=False,
                 log=lambda *_: 0)
    same_checkpoint(tmp_path / "s", tmp_path / "m")
