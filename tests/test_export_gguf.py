"""GGUF export: encoders checked against gguf-py's dequantizers; whole exports read back by transformers' own GGUF
loader (a reader we did not write) and compared with matquant's slice; bad input refused with nothing left."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

from matquant.algorithms import quantize_model  # noqa: E402
from matquant.cli import main  # noqa: E402
from matquant.format.checkpoint import save_checkpoint  # noqa: E402
from matquant.integrations import gguf_blocks as gb  # noqa: E402
from matquant.integrations.export_slices import ExportError, load_for_export  # noqa: E402
from matquant.integrations.gguf_export import export_gguf, llama_row_permutation, read_tensor_types  # noqa: E402

# intermediate 256: ffn_down rows are 256 wide (K-quants possible), the others 64 (they are not)
TINY_GGUF = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0)


def tiny_llama(vocab: int, seed: int = 0, **over):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=vocab, tie_word_embeddings=True, **{**TINY_GGUF, **over})
    return tf.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()


def write_template(model, tok, path):
    """A minimal llama GGUF of an HF model the way llama.cpp's converter lays it out (F32 tensors, q/k rows
    permuted, tokenizer as gpt2 BPE): the stand-in for convert_hf_to_gguf.py in tests."""
    c = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    w.add_rope_freq_base(c.rope_parameters["rope_theta"] if getattr(c, "rope_parameters", None) else c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    spec = json.loads(tok.backend_tokenizer.to_str())["model"]
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    tokens += [f"<pad{i}>" for i in range(c.vocab_size - len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["merges"]]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_token_id)
    w.add_eos_token_id(tok.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue  # tied: llama.cpp stores no output tensor
        base, _, suf = k.rpartition(".")
        g = f"{names.get_name(base)}.{suf}"
        x = v.detach().float().numpy()
        if ".attn_q." in g:
            x = x[llama_row_permutation(x.shape[0], c.num_attention_heads)]
        if ".attn_k." in g:
            x = x[llama_row_permutation(x.shape[0], c.num_attention_heads, c.num_key_value_heads)]
        w.add_tensor(g, np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory, tiny_tokenizer):
    """(fp model, template path, checkpoint folders by name)."""
    d = tmp_path_factory.mktemp("gguf")
    vocab = 320
    template = write_template(tiny_llama(vocab), tiny_tokenizer, d / "tiny-f32.gguf")
    ckpts = {}
    for name, kw in {"nested-g64": dict(group_size=64, slicing="nested"),
                     "paper-g32": dict(group_size=32, slicing="paper"),
                     "nested-g16": dict(group_size=16, slicing="nested")}.items():
        m = tiny_llama(vocab)
        q = quantize_model(m, "rtn", scope="ffn+attn", progress=False, **kw)
        ckpts[name] = save_checkpoint(m, tiny_tokenizer, d / name, q)
    m = tiny_llama(vocab)  # slice-own (α, z): every exported slice carries its own block scales
    calib = torch.randint(0, vocab, (4, 32), generator=torch.Generator().manual_seed(3))
    q = quantize_model(m, "gptq", scope="ffn+attn", progress=False, group_size=64, slicing="nested", calib=calib,
                       slice_params="own")
    ckpts["own-g64"] = save_checkpoint(m, tiny_tokenizer, d / "own-g64", q)
    return template, ckpts, d


def _read_back(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _ids():
    torch.manual_seed(1)
    return torch.randint(0, 320, (2, 24))


def _compare(model, back, report):
    """Every quantized weight as transformers reads it vs matquant's slice; then the logits."""
    from matquant.nn.bits import matquant_modules

    by_module = {t.module: t for t in report.tensors}
    for name, m in matquant_modules(model).items():
        ref = m.dequantized_weight(torch.float32)
        got = back.get_submodule(name).weight.detach()
        t = by_module[name]
        if t.exact:  # exact up to the fp16 rounding of m (d = α·2^s is an fp16 value times a power of two)
            b = _ab(m)[1].repeat_interleave(m.group_size, 1)
            assert ((got - ref).abs() <= b.abs() * 2.0**-11 + 1e-7).all(), name
        else:  # what transformers reads is what we measured with gguf-py's dequantizer
            rms = (got - ref).pow(2).mean().sqrt().item()
            assert abs(rms - t.rms_error) <= 1e-3 * t.rms_error + 1e-7, name
    with torch.no_grad():
        lm, lb = model(_ids()).logits, back(_ids()).logits
    return (lm - lb).abs().max().item() / lm.abs().max().item()


def _ab(m):
    from matquant.kernels.cpu import slice_params

    return slice_params(*m.group_params(), m.master_bits, m.bits, m.slicing)


# ---------------------------------------------------------------- encoders vs gguf-py's dequantizers

@pytest.mark.parametrize("bits,enc,qt", [(4, gb.encode_q4_1, T.Q4_1), (5, gb.encode_q5_1, T.Q5_1)])
def test_affine_encoders_are_exact(bits, enc, qt):
    rng = np.random.default_rng(0)
    q = rng.integers(0, 2**bits, (6, 256)).astype(np.uint8)
    d = rng.random((6, 8)).astype(np.float16).astype(np.float32)  # fp16 values: nothing left to round
    m = (-rng.random((6, 8))).astype(np.float16).astype(np.float32)
    out = dequantize(enc(q, d, m), qt)
    np.testing.assert_array_equal(out, q * np.repeat(d, 32, 1) + np.repeat(m, 32, 1))


def test_recentre_codes_keeps_values_and_shrinks_m():
    rng = np.random.default_rng(1)
    q = rng.integers(4, 8, (4, 64)).astype(np.uint8)  # a block whose codes start at 4: shift them down to 0
    d = np.full((4, 2), 0.01, np.float32)
    m = np.full((4, 2), -0.0512345, np.float32)
    q2, m2 = gb.recentre_codes(q, d, m, 15)
    assert q2.min() == 0 and (np.abs(m2) < np.abs(m)).all()
    np.testing.assert_allclose(q2 * np.repeat(d, 32, 1) + np.repeat(m2, 32, 1),
                               q * np.repeat(d, 32, 1) + np.repeat(m, 32, 1), atol=1e-7)


@pytest.mark.parametrize("enc,qt,bits", [(gb.encode_q8_0, T.Q8_0, 8), (gb.encode_q6_k, T.Q6_K, 6),
                                         (gb.encode_q3_k, T.Q3_K, 3)])
def test_symmetric_encoders_fit_the_values(enc, qt, bits):
    v = np.random.default_rng(2).standard_normal((4, 512)).astype(np.float32)
    err = np.sqrt(((dequantize(enc(v), qt) - v) ** 2).mean())
    # a uniform quantizer over ~±2.5σ with 2^bits levels has rms error ≈ step/√12; allow 1.5x
    assert err < 1.5 * (5.0 / 2**bits) / np.sqrt(12)
    if qt == T.Q8_0:  # fitted scales are never worse than ggml's own max-abs rounding
        assert err <= np.sqrt(((dequantize(gguf.quants.quantize(v, qt), qt) - v) ** 2).mean())


def test_q2_k_holds_a_2bit_lattice_nearly_exactly():
    rng = np.random.default_rng(3)
    q = rng.integers(0, 4, (4, 512))
    a = np.repeat(rng.uniform(0.05, 0.1, (4, 8)), 64, 1)
    b = np.repeat(-rng.uniform(0.1, 0.2, (4, 8)), 64, 1)
    v = q * a + b
    err = np.sqrt(((dequantize(gb.encode_q2_k(v, a, b), T.Q2_K) - v) ** 2).mean())
    assert err < 0.05 * np.sqrt((v**2).mean())  # only the 4-bit scale/min quantization is lost


# ---------------------------------------------------------------- whole exports, read by transformers

@pytest.mark.parametrize("ckpt", ["nested-g64", "paper-g32"])
def test_int4_is_q4_1_exact_and_transformers_reads_it(tiny_setup, ckpt, tmp_path):
    template, ckpts, _ = tiny_setup
    model, tok, _ = load_for_export(ckpts[ckpt], 4)
    rep = export_gguf(model, tok, tmp_path / "m.gguf", template=template)
    assert {t.qtype for t in rep.tensors} == {"Q4_1"} and all(t.exact for t in rep.tensors)
    assert len(rep.tensors) == 14 and rep.bits_per_weight == 5.0
    rel = _compare(model, _read_back(tmp_path / "m.gguf"), rep)
    assert rel < 2e-3  # fp16 rounding of m only


@pytest.mark.parametrize("bits, ckpt", [(2, "nested-g64"), (3, "nested-g64"), (4, "own-g64"), (3, "own-g64"),
                                        (2, "own-g64")])
def test_low_bits_are_exact_in_q4_1(tiny_setup, bits, ckpt, tmp_path):
    template, ckpts, _ = tiny_setup
    model, tok, _ = load_for_export(ckpts[ckpt], bits)
    rep = export_gguf(model, tok, tmp_path / "m.gguf", template=template)
    assert all(t.qtype == "Q4_1" and t.exact for t in rep.tensors)
    assert _compare(model, _read_back(tmp_path / "m.gguf"), rep) < 2e-3


def test_bits_map_gives_per_tensor_types_in_one_file(tiny_setup, tmp_path):
    template, ckpts, _ = tiny_setup
    bmap = {r"model\.layers\.0\..*": 2, "*.down_proj": 8, "*.self_attn.*": 5, ".*": 4}
    model, tok, _ = load_for_export(ckpts["nested-g64"], bmap)
    out = tmp_path / "mix.gguf"
    rep = export_gguf(model, tok, out, template=template)
    types = read_tensor_types(out)
    assert types["blk.0.ffn_gate.weight"] == "Q4_1" and types["blk.1.ffn_down.weight"] == "Q8_0"
    assert types["blk.1.attn_q.weight"] == "Q5_1" and types["blk.1.ffn_up.weight"] == "Q4_1"
    assert types["blk.0.attn_norm.weight"] == "F32"
    rel = _compare(model, _read_back(out), rep)
    assert rel < 5e-3  # Q8_0 (nearest) on the down projections; stated bound in docs/export.md


def test_k_quants_where_rows_allow_and_fallback_is_reported(tiny_setup, tmp_path):
    template, ckpts, _ = tiny_setup
    model, tok, _ = load_for_export(ckpts["nested-g64"], 2)
    rep = export_gguf(model, tok, tmp_path / "k.gguf", template=template, k_quants=True)
    by = {t.name: t for t in rep.tensors}
    assert by["blk.0.ffn_down.weight"].qtype == "Q2_K" and not by["blk.0.ffn_down.weight"].exact
    assert by["blk.0.ffn_gate.weight"].qtype == "Q4_1" and "divisible by 256" in by["blk.0.ffn_gate.weight"].note
    assert by["blk.0.ffn_down.weight"].rel_rms_error < 0.1  # 4-bit sub-block scale and min (measured ~5 %)
    assert "divisible by 256" in rep.summary()
    _compare(model, _read_back(tmp_path / "k.gguf"), rep)


@pytest.mark.parametrize("bits, qtype", [(4, "Q4_K"), (2, "Q2_K")])
def test_k_quants_keep_the_slice_codes(tiny_setup, tmp_path, bits, qtype):
    """--k-quants at int4/int2: where rows divide 256 the tensor is the slice's OWN codes under the K-quant's fitted
    sub-block scales and mins (4.5 / 2.625 bits per weight), read back by gguf-py as those values; at least as close
    to the slice as the naive fit (per sub-block least squares, rounded) of the same codes."""
    from matquant.integrations.export_slices import module_slice
    from matquant.quant.kquant import dequantize_kquant, initial_kquant

    template, ckpts, _ = tiny_setup
    model, tok, _ = load_for_export(ckpts["nested-g64"], bits)
    out = tmp_path / "k.gguf"
    rep = export_gguf(model, tok, out, template=template, k_quants=True)
    t = {x.name: x for x in rep.tensors}["blk.0.ffn_down.weight"]
    assert t.qtype == qtype and "same codes" in t.note
    st = module_slice("model.layers.0.mlp.down_proj", model.get_submodule("model.layers.0.mlp.down_proj"))
    v = st.reference.numpy()
    stored = next(x for x in gguf.GGUFReader(str(out)).tensors if x.name == "blk.0.ffn_down.weight")
    assert 8 * int(stored.n_bytes) / int(stored.n_elements) == {"Q4_K": 4.5, "Q2_K": 2.625}[qtype]
    got = dequantize(stored.data, getattr(T, qtype)).reshape(v.shape)
    naive = dequantize_kquant(initial_kquant(qtype, st.codes.numpy(), v))
    assert ((got - v) ** 2).sum() <= ((naive - v) ** 2).sum() * (1 + 1e-6)
    assert np.sqrt(((got - v) ** 2).mean() / (v ** 2).mean()) < (0.05 if bits == 4 else 0.15)


# ---------------------------------------------------------------- bad input: one clear error, nothing left

def _left(d):
    return sorted(p.name for p in d.iterdir())


def test_group_not_multiple_of_32_is_refused(tiny_setup, tmp_path):
    template, ckpts, _ = tiny_setup
    model, tok, _ = load_for_export(ckpts["nested-g16"], 4)
    with pytest.raises(ExportError, match="not a multiple of 32"):
        export_gguf(model, tok, tmp_path / "x.gguf", template=template)
    assert _left(tmp_path) == []


def test_template_of_another_size_or_arch_is_refused(tiny_setup, tiny_tokenizer, tmp_path):
    template, ckpts, _ = tiny_setup
    model, tok, _ = load_for_export(ckpts["nested-g64"], 4)
    other = write_template(tiny_llama(320, num_hidden_layers=3), tiny_tokenizer, tmp_path / "other.gguf")
    with pytest.raises(ExportError, match="block_count = 3"):
        export_gguf(model, tok, tmp_path / "x.gguf", template=other)
    model.config.model_type = "qwen2"
    with pytest.raises(ExportError, match="'llama' model but the checkpoint is 'qwen2'"):
        export_gguf(model, tok, tmp_path / "x.gguf", template=template)
    assert _left(tmp_path) == ["other.gguf"]


def test_cli_export_and_bad_input(tiny_setup, tmp_path, capsys):
    template, ckpts, d = tiny_setup
    out = tmp_path / "cli.gguf"
    ck = str(ckpts["nested-g64"])
    assert main(["export", ck, "--bits", "4", "--format", "gguf", "--out", str(out), "--template", str(template)]) == 0
    assert "14x Q4_1 (exact)" in capsys.readouterr().out and out.exists()
    # existing output
    assert main(["export", ck, "--bits", "4", "--format", "gguf", "--out", str(out), "--template", str(template)]) == 1
    assert "already exists" in capsys.readouterr().err
    # unknown format: argparse names the choices
    with pytest.raises(SystemExit):
        main(["export", ck, "--bits", "4", "--format", "onnx", "--out", str(tmp_path / "y")])
    assert "invalid choice: 'onnx'" in capsys.readouterr().err
    # bits the checkpoint/format cannot hold
    assert main(["export", ck, "--bits", "9", "--format", "gguf", "--out", str(tmp_path / "y.gguf")]) == 1
    assert "--bits must be in 1..8" in capsys.readouterr().err
    # checkpoint without tokenizer
    import shutil

    bare = tmp_path / "bare"
    shutil.copytree(ck, bare)
    for f in bare.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            f.unlink()
    assert main(["export", str(bare), "--bits", "4", "--format", "gguf", "--out", str(tmp_path / "z.gguf"),
                 "--template", str(template)]) == 1
    assert "no tokenizer" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare", "cli.gguf"]


def test_dense_f32_slice_is_the_slice(tiny_setup, tmp_path):
    """The like-for-like reference the llama.cpp benchmark compares the quantized file with."""
    template, ckpts, _ = tiny_setup
    model, tok, _ = load_for_export(ckpts["nested-g64"], 3)
    rep = export_gguf(model, tok, tmp_path / "d.gguf", template=template, dense="F32")
    assert {t.qtype for t in rep.tensors} == {"F32"} and max(t.max_error for t in rep.tensors) == 0.0
    assert _compare(model, _read_back(tmp_path / "d.gguf"), rep) < 1e-5
