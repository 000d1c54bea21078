import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import matquant
from matquant.algorithms import quantize_model
from matquant.format.checkpoint import load_checkpoint, save_checkpoint
from matquant.format.config import CheckpointError
from matquant.format.atomic import atomic_dir

from conftest import tiny_model


@pytest.fixture
def ckpt(tmp_path, tiny_tokenizer):
    model = tiny_model("llama")
    qcfg = quantize_model(model, "rtn", group_size=32, scope="ffn+attn", slicing="nested")
    d = tmp_path / "ckpt"
    save_checkpoint(model, tiny_tokenizer, d, qcfg)
    return d, model


def test_round_trip_bit_exact(ckpt):
    d, model = ckpt
    loaded, tok, q = load_checkpoint(d)
    assert q.slicing == "nested" and tok is not None
    x = torch.randint(0, 320, (2, 12))
    for b in (8, 4, 2):
        matquant.set_bits(model, b)
        matquant.set_bits(loaded, b)
        with torch.no_grad():
            assert torch.equal(model(x).logits, loaded(x).logits)
    sd = load_file(str(d / "model.safetensors"))
    assert sd["model.layers.0.mlp.up_proj.qweight"].dtype == torch.uint8
    assert "lm_head.weight" not in sd  # tied to the embedding, stored once


def test_transformers_from_pretrained_and_load(ckpt):
    from transformers import AutoModelForCausalLM

    d, model = ckpt
    hf = AutoModelForCausalLM.from_pretrained(d)
    assert isinstance(hf.model.layers[0].mlp.up_proj, matquant.MatQuantLinear)
    assert hf.model.layers[0].mlp.up_proj.scales.dtype == torch.float16
    x = torch.randint(0, 320, (1, 10))
    for b in (8, 3):
        matquant.set_bits(hf, b)
        matquant.set_bits(model, b)
        with torch.no_grad():
            assert torch.equal(hf(x).logits, model(x).logits)
    m2, tok = matquant.load(d, bits={"model.layers.*.mlp.*": 2})
    assert matquant.get_bits(m2)["model.layers.1.mlp.down_proj"] == 2
    assert matquant.get_bits(m2)["model.layers.1.self_attn.q_proj"] == 8


def test_bits_map_stored_in_config_is_applied(ckpt):
    d, _ = ckpt
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["bits_map"] = {"model.layers.0.mlp.*": 4}
    (d / "config.json").write_text(json.dumps(cfg))
    m, _, _ = load_checkpoint(d)
    assert matquant.get_bits(m)["model.layers.0.mlp.gate_proj"] == 4


def _edit_qcfg(d, **kv):
    cfg = json.loads((d / "config.json").read_text())
    for k, v in kv.items():
        if v is None:
            cfg["quantization_config"].pop(k)
        else:
            cfg["quantization_config"][k] = v
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("edit,match", [
    (dict(master_bits=9), "master_bits must be an integer in 1..8"),
    (dict(default_bits=0), "default_bits"),
    (dict(format_version=99), "format_version 99 is not supported"),
    (dict(modules=None), "missing required key"),
    (dict(slicing="weird"), "unknown slicing mode"),
    (dict(group_size=0), "group_size"),
    (dict(bits_map={"model.layers.0.mlp.up_proj": 12}), "1..8"),
    (dict(surprise=1), "unknown key"),
])
def test_bad_config_is_rejected(ckpt, edit, match):
    d, _ = ckpt
    _edit_qcfg(d, **edit)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(d)


def test_invalid_json_and_missing_files(ckpt, tmp_path):
    d, _ = ckpt
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(d)
    with pytest.raises(CheckpointError, match="not a folder"):
        load_checkpoint(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_checkpoint(empty)


def test_truncated_and_corrupt_weights(ckpt):
    d, _ = ckpt
    w = d / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated|cannot be read"):
        load_checkpoint(d)
    w.write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(d)


def test_missing_tensor_wrong_shape_wrong_dtype(ckpt):
    d, _ = ckpt
    w = d / "model.safetensors"
    sd = load_file(str(w))
    k = "model.layers.0.mlp.up_proj.qweight"
    bad = dict(sd)
    del bad[k]
    save_file(bad, str(w))
    with pytest.raises(CheckpointError, match="missing 1 tensor"):
        load_checkpoint(d)
    bad = dict(sd, **{k: sd[k][:, :-1].contiguous()})
    save_file(bad, str(w))
    with pytest.raises(CheckpointError, match="shape"):
        load_checkpoint(d)
    bad = dict(sd, **{k: sd[k].float()})
    save_file(bad, str(w))
    with pytest.raises(CheckpointError, match="uint8"):
        load_checkpoint(d)
    bad = dict(sd, **{"model.layers.0.mlp.up_proj.scales": torch.full_like(sd["model.layers.0.mlp.up_proj.scales"],
                                                                            float("nan"))})
    save_file(bad, str(w))
    with pytest.raises(CheckpointError, match="NaN"):
        load_checkpoint(d)


def test_pickle_is_never_loaded(ckpt):
    d, _ = ckpt
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="never loads pickle"):
        load_checkpoint(d)


def test_atomic_dir_leaves_nothing_on_failure_and_refuses_overwrite(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as tmp:
            (tmp / "half.txt").write_text("x")
            raise RuntimeError("crash mid-write")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(FileExistsError, match="--overwrite"):
        with atomic_dir(out):
            pass
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "b").write_text("2")
    assert sorted(p.name for p in out.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_save_failure_keeps_previous_checkpoint(ckpt, monkeypatch, tiny_tokenizer):
    d, model = ckpt
    before = (d / "model.safetensors").read_bytes()
    import matquant.format.checkpoint as C

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(C.ShardWriter, "close", boom)  # the weights are written, then the shard cannot be finished
    from matquant.format.config import QuantConfig

    _, q = C.read_quant_config(d)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, tiny_tokenizer, d, q, overwrite=True)
    assert (d / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in d.parent.iterdir()) == ["ckpt"]


def test_two_saves_of_one_model_are_byte_identical(ckpt, tmp_path, tiny_tokenizer):
    """Reruns (kill-anywhere, experiment grids) are compared byte for byte: nothing in a save may depend on hash order."""
    d, model = ckpt
    loaded, _, q = load_checkpoint(d)
    for i in range(3):
        save_checkpoint(loaded, tiny_tokenizer, tmp_path / f"again{i}", q)
        assert (tmp_path / f"again{i}" / "model.safetensors").read_bytes() == (d / "model.safetensors").read_bytes()


def test_gpt2_conv1d_checkpoint_loads_through_from_pretrained(tmp_path):
    """GPT-2's _init_weights reaches into c_proj.weight of every block; a quantized c_proj has none."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=2, vocab_size=320, n_positions=64,
                                       bos_token_id=0, eos_token_id=0)).eval()
    qc = quantize_model(model, "rtn", group_size=32, scope="ffn+attn", progress=False)
    x = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        ref = model(x).logits
    save_checkpoint(model, None, tmp_path / "ck", qc)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    loaded, _ = matquant.load(tmp_path / "ck", backend="torch")
    with torch.no_grad():
        assert torch.equal(hf(x).logits, ref)
        assert torch.equal(loaded(x).logits, ref)
