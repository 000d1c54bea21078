"""GGUF export of a model that came from an HF folder (no template GGUF: metadata and tokenizer written from the
checkpoint's config and tokenizer, gguf_metadata), streamed from the checkpoint one tensor at a time (CheckpointSource,
single file or shards). Read back by gguf-py and by transformers' own GGUF loader (weights, tokenizer, logits)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from matquant.algorithms import quantize_model  # noqa: E402
from matquant.cli import main  # noqa: E402
from matquant.format.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from matquant.format.config import CheckpointError  # noqa: E402
from matquant.integrations.export_slices import CheckpointSource, ExportError  # noqa: E402
from matquant.integrations.gguf_export import export_gguf  # noqa: E402
from matquant.integrations.gguf_metadata import pre_tokenizer_name  # noqa: E402

VOCAB = 320
QWEN_VOCAB = 336
SHAPES = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=256)


def _model(arch: str):
    import transformers as tf

    torch.manual_seed(0)
    if arch == "llama":  # tied head, GQA: Q/K rows permuted in the file
        cfg = tf.LlamaConfig(tie_word_embeddings=True, rms_norm_eps=1e-5, **SHAPES)
    else:  # qwen2: q/k/v biases, untied head (written as F16), no permutation; transformers reads the tokenizer
        # as Qwen2Tokenizer, which adds <|endoftext|> (id 320): a larger vocabulary (rows past it are "[PAD<id>]")
        cfg = tf.Qwen2Config(tie_word_embeddings=False, rms_norm_eps=1e-6, **{**SHAPES, "vocab_size": QWEN_VOCAB})
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_tokenizer):
    """{arch: checkpoint folder} quantized from a fresh HF model; llama's checkpoint is sharded."""
    d = tmp_path_factory.mktemp("gguf_hf")
    out = {}
    for arch in ("llama", "qwen2"):
        m = _model(arch)
        q = quantize_model(m, "rtn", scope="ffn+attn", group_size=32, slicing="nested", progress=False)
        out[arch] = save_checkpoint(m, tiny_tokenizer, d / arch, q,
                                    max_shard_bytes=64 * 1024 if arch == "llama" else None)
    return out


def tok_last(ck):
    from matquant.format.checkpoint import load_tokenizer

    return load_tokenizer(ck).convert_ids_to_tokens(VOCAB - 1)


def _read_back(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.parametrize("arch, bits", [("llama", 4), ("qwen2", 2)])
def test_no_template_gguf_loads_in_transformers_with_the_slices_logits(ckpts, arch, bits, tmp_path, capsys):
    ck = ckpts[arch]
    assert (ck / "model.safetensors.index.json").exists() == (arch == "llama")
    out = tmp_path / "m.gguf"
    assert main(["export", str(ck), "--bits", str(bits), "--format", "gguf", "--out", str(out)]) == 0
    assert "no template" in capsys.readouterr().out
    r = gguf.GGUFReader(str(out))
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("GGUF.")}
    assert f["general.architecture"] == arch and f[f"{arch}.block_count"] == 2
    assert f[f"{arch}.attention.head_count"] == 4 and f[f"{arch}.attention.head_count_kv"] == 2
    assert f[f"{arch}.embedding_length"] == 64 and f[f"{arch}.feed_forward_length"] == 256
    # transformers reads the qwen2 checkpoint's tokenizer as Qwen2Tokenizer, with Qwen2's own split regex
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == ("gpt-2" if arch == "llama" else "qwen2")
    vocab = VOCAB if arch == "llama" else QWEN_VOCAB
    assert len(f["tokenizer.ggml.tokens"]) == vocab and len(f["tokenizer.ggml.merges"]) > 0
    assert f["tokenizer.ggml.tokens"][vocab - 1] == ("[PAD335]" if arch == "qwen2" else tok_last(ck))
    names = {t.name: t.tensor_type.name for t in r.tensors}
    assert names["blk.0.attn_q.weight"] == "Q4_1" and names["blk.1.ffn_down.weight"] == "Q4_1"
    assert names["token_embd.weight"] == "F16" and names["blk.0.attn_norm.weight"] == "F32"
    assert ("output.weight" in names) == (arch == "qwen2") and ("blk.0.attn_q.bias" in names) == (arch == "qwen2")

    model, tok, _ = load_checkpoint(ck, bits=bits)
    back, back_tok = _read_back(out)
    text = "The quick brown fox jumps over 12 lazy dogs."
    assert back_tok(text).input_ids == tok(text).input_ids
    from matquant.nn.bits import matquant_modules

    for name, m in matquant_modules(model).items():  # exact up to the fp16 rounding of Q4_1's d and m
        ref = m.dequantized_weight(torch.float32)
        got = back.get_submodule(name).weight.detach()
        assert (got - ref).abs().max() <= 2e-3 * ref.abs().max(), name
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lm, lb = model(ids).logits, back(ids).logits
    assert (lm - lb).abs().max().item() / lm.abs().max().item() < 2e-3  # fp16 rounding (m, embedding)


def test_sharded_and_single_file_checkpoints_give_the_same_file(ckpts, tmp_path, tiny_tokenizer):
    """The streaming reader reads either layout; the file does not depend on it (nor on a model in memory)."""
    import shutil

    single = tmp_path / "single"
    model, tok, q = load_checkpoint(ckpts["llama"])
    save_checkpoint(model, tok, single, q)
    assert (single / "model.safetensors").exists()
    outs = []
    for i, ck in enumerate((ckpts["llama"], single)):
        with CheckpointSource(ck, 3) as src:
            export_gguf(src, None, tmp_path / f"{i}.gguf")
            assert all(t.is_meta for m in src.qmods.values() for t in m.buffers())  # nothing kept after export
        outs.append((tmp_path / f"{i}.gguf").read_bytes())
    model, tok, _ = load_checkpoint(single, bits=3)
    export_gguf(model, tok, tmp_path / "mem.gguf", template="none")
    assert outs[0] == outs[1] == (tmp_path / "mem.gguf").read_bytes()
    shutil.rmtree(single)


def test_corrupt_tensor_is_a_clear_error_and_nothing_is_left(ckpts, tmp_path):
    import json
    import shutil
    import struct

    ck = tmp_path / "ck"
    shutil.copytree(ckpts["qwen2"], ck)
    w = ck / "model.safetensors"
    raw = bytearray(w.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = "model.layers.1.mlp.up_proj.scales"
    a, _ = header[name]["data_offsets"]
    raw[8 + n + a:8 + n + a + 2] = np.array([np.nan], np.float16).tobytes()
    w.write_bytes(bytes(raw))
    out = tmp_path / "x.gguf"
    with pytest.raises(CheckpointError, match="NaN"):
        with CheckpointSource(ck, 4) as src:
            export_gguf(src, None, out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_unsupported_tokenizer_or_rope_is_refused(ckpts, tmp_path):
    with CheckpointSource(ckpts["qwen2"], 4) as src:
        src.config.rope_parameters = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}
        with pytest.raises(ExportError, match="RoPE scaling 'yarn'.*--template"):
            export_gguf(src, None, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Whitespace"}}) is None
    assert pre_tokenizer_name({"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, {"type": "ByteLevel", "use_regex": True}]}}) == "smollm"
