"""Streaming exports (`matquant export` reads the checkpoint one tensor at a time through CheckpointSource and writes
through ShardWriter): from a sharded checkpoint, hf and compressed-tensors folders come out sharded like it, with
the same tensors as the export of the whole model in memory; the source holds no module's codes after an export."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_model

from matquant.algorithms import quantize_model
from matquant.cli import main
from matquant.format.checkpoint import load_checkpoint, save_checkpoint
from matquant.format.export import plain_state_dict
from matquant.format.shards import INDEX_NAME, TensorReader
from matquant.integrations.export_slices import CheckpointSource


@pytest.fixture(scope="module")
def sharded(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("stream")
    m = tiny_model("llama")
    q = quantize_model(m, "rtn", scope="ffn+attn", group_size=32, slicing="nested", progress=False)
    ck = save_checkpoint(m, tiny_tokenizer, d / "ck", q, max_shard_bytes=32 * 1024)
    assert (ck / INDEX_NAME).exists() and len(json.loads((ck / INDEX_NAME).read_text())["weight_map"]) > 0
    return ck


def _tensors(folder):
    r = TensorReader(folder)
    return {k: r.get(k) for k in r.names()}


def test_hf_export_is_sharded_like_the_input_and_is_the_slice(sharded, tmp_path):
    out = tmp_path / "hf"
    assert main(["export", str(sharded), "--bits", "3", "--format", "hf", "--out", str(out)]) == 0
    assert (out / INDEX_NAME).exists() and len(list(out.glob("model-*-of-*.safetensors"))) > 1
    model, _, _ = load_checkpoint(sharded, bits=3)
    want = {k: v for k, v in plain_state_dict(model).items() if k != "lm_head.weight"}  # tied: stored once
    got = _tensors(out)
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k].float()) for k in want)
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(back(ids).logits, model(ids).logits, atol=1e-5)


def test_compressed_tensors_streamed_equals_in_memory(sharded, tmp_path):
    pytest.importorskip("compressed_tensors")
    from matquant.integrations.compressed_tensors_export import export_compressed_tensors

    out = tmp_path / "ct"
    assert main(["export", str(sharded), "--bits", "4", "--format", "compressed-tensors", "--dtype", "float32",
                 "--out", str(out)]) == 0
    assert (out / INDEX_NAME).exists()
    model, tok, _ = load_checkpoint(sharded, bits=4)
    export_compressed_tensors(model, tok, tmp_path / "mem", dtype=torch.float32)
    assert not (tmp_path / "mem" / INDEX_NAME).exists()  # a model in memory: one file
    a, b = _tensors(out), _tensors(tmp_path / "mem")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((out / "config.json").read_text()) == json.loads((tmp_path / "mem" / "config.json").read_text())


def test_source_reads_one_module_at_a_time(sharded):
    with CheckpointSource(sharded, 2) as src:
        assert src.sharded and src.out_shard_bytes() == max(p.stat().st_size for p in sharded.glob("model-*"))
        name = src.slice_names[0]
        st = src.slice(name)
        assert st.bits == 2 and st.codes.max() <= 3 and st.shape == src.layout(name).shape
        assert all(t.is_meta for m in src.qmods.values() for t in m.buffers())  # nothing stays after a slice
        model, _, _ = load_checkpoint(sharded, bits=2)
        assert torch.equal(st.reference, model.get_submodule(name).dequantized_weight(torch.float32))
