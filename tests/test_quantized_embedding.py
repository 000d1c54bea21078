"""Int8 token embedding and output head (issue 27, part 2; nn/quantized_embedding.py): the per-row table, the
gather-then-dequantize embedding (exact), the head against the dequantized-table product (bf16 activations), tied
tables stay one table, the `load(quantize_embeddings=)` / `generate --embeddings` options and resident bytes."""
import pytest
import torch

import matquant
from matquant.algorithms import quantize_model
from matquant.cli import main
from matquant.format.checkpoint import save_checkpoint
from matquant.kernels import cpu_packed
from matquant.nn import quantized_embedding as qe
from matquant.nn.memory import embedding_resident_bytes, resident_bytes, resident_bytes_by_part

from conftest import tiny_model, tiny_rtn_checkpoint

# the head runs its activations in bf16 (8 significant bits): measured on random data the error is well under
# 1 % of the output's largest magnitude; 2 % leaves margin for accumulation-order differences
HEAD_TOL = 2e-2


def _rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def test_rows_quantize_within_half_a_step_and_scales_never_clip():
    torch.manual_seed(0)
    w = torch.randn(300, 96) * torch.logspace(-3, 1, 300)[:, None]
    w[7] = 0.0  # an all-zero row
    codes, scales = qe.quantize_rows_int8(w)
    assert codes.dtype == torch.int8 and scales.dtype == torch.bfloat16 and scales.shape == (300,)
    assert codes.abs().max() <= 127 and torch.all(codes[7] == 0) and scales[7] == 1
    assert torch.all(scales.float() >= w.abs().amax(1) / 127)  # rounded up: no code is clipped
    err = (qe.dequantize_rows(codes, scales) - w).abs()
    assert torch.all(err <= scales.float()[:, None] / 2 * (1 + 1e-6))
    # each row uses (nearly) the full range: the scale was rounded up by at most one bf16 step
    assert codes[w.abs().amax(1) > 0].abs().amax(1).min() >= 126


def test_embedding_gathers_then_dequantizes_exactly():
    torch.manual_seed(1)
    table = qe.Int8Table.from_weight(torch.randn(50, 32))
    ids = torch.randint(0, 50, (3, 7))
    ref = qe.dequantize_rows(table.codes, table.scales)[ids]
    assert torch.equal(qe.Int8Embedding(table, torch.float32)(ids), ref)
    bf = qe.Int8Embedding(table, torch.bfloat16)(ids)
    assert bf.dtype == torch.bfloat16 and torch.equal(bf, ref.to(torch.bfloat16))
    scaled = qe.Int8Embedding(table, torch.float32, embed_scale=torch.tensor(8.0))(ids)
    assert torch.equal(scaled, ref * 8)


@pytest.mark.parametrize("rows", [1, 5, qe.KERNEL_MAX_ROWS, qe.KERNEL_MAX_ROWS + 3])
def test_head_matches_the_dequantized_product(rows, monkeypatch):
    monkeypatch.setattr(qe, "HEAD_CHUNK_ROWS", 96)  # several chunks, the last one partial, on the many-rows path
    torch.manual_seed(2)
    table = qe.Int8Table.from_weight(torch.randn(400, 64) * 0.05)
    x = torch.randn(2, rows, 64)
    out = qe.Int8Head(table, torch.float32)(x)
    ref = x @ qe.dequantize_rows(table.codes, table.scales).T
    assert out.shape == (2, rows, 400) and out.dtype == torch.float32
    assert _rel_err(out, ref) < HEAD_TOL


def test_head_paths_agree():
    """The int8 kernel (few rows) and the chunked bf16 path (many rows) give the same logits for the same rows."""
    torch.manual_seed(3)
    head = qe.Int8Head(qe.Int8Table.from_weight(torch.randn(300, 64)), torch.float32)
    x = torch.randn(qe.KERNEL_MAX_ROWS + 1, 64)
    assert _rel_err(head(x)[:4], head(x[:4])) < 1e-2


def test_tied_pair_shares_one_table_and_is_counted_once():
    model = tiny_model("llama")  # tie_word_embeddings=True
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(ids).logits
    before = resident_bytes(model)
    done = qe.quantize_embeddings(model)
    assert set(done) == {"model.embed_tokens", "lm_head"} and "tied" in done["lm_head"]
    assert model.model.embed_tokens.table is model.lm_head.table
    assert qe.has_quantized_embeddings(model)
    assert qe.quantize_embeddings(model) == {}  # idempotent
    table = 320 * 64 + 320 * 2  # int8 codes + bf16 scales
    assert embedding_resident_bytes(model) == table
    assert before - resident_bytes(model) == 320 * 64 * 4 - table
    with torch.no_grad():
        assert _rel_err(model(ids).logits, ref) < 5e-2


def test_untied_pair_gets_two_tables():
    model = tiny_model("qwen2")
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    qe.quantize_embeddings(model)
    assert model.model.embed_tokens.table is not model.lm_head.table
    assert embedding_resident_bytes(model) == 2 * (320 * 64 + 320 * 2)


def test_gemma3_scaled_embedding_keeps_its_scale():
    from test_gemma3 import tiny_gemma3

    model = tiny_gemma3()
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref_emb = model.get_input_embeddings()(ids)
        ref = model(ids).logits
    qe.quantize_embeddings(model)
    with torch.no_grad():
        emb = model.get_input_embeddings()(ids)
        assert _rel_err(emb, ref_emb) < 1e-2  # int8 rounding only: the sqrt(hidden) scale is applied
        assert _rel_err(model(ids).logits, ref) < 5e-2


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_rtn_checkpoint(tmp_path_factory, "qe")


@pytest.mark.skipif(not cpu_packed.available(), reason="torch has no CPU int4 kernel")
def test_load_option_and_its_defaults(ckpt):
    ids = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(0))
    plain, _ = matquant.load(ckpt, bits=4, keep_master=False)
    assert not qe.has_quantized_embeddings(plain)  # off by default without a budget
    q, _ = matquant.load(ckpt, bits=4, keep_master=False, quantize_embeddings=True)
    assert qe.has_quantized_embeddings(q) and q.model.embed_tokens.table is q.lm_head.table
    assert resident_bytes(plain) - resident_bytes(q) == 320 * 64 * 4 - (320 * 64 + 320 * 2)
    with torch.no_grad():
        assert _rel_err(q(ids).logits, plain(ids).logits) < 5e-2
    kept, _ = matquant.load(ckpt, bits=4, quantize_embeddings=True)  # the keep_master=True path
    assert qe.has_quantized_embeddings(kept)
    budget, _ = matquant.load(ckpt, budget="10MB")
    assert qe.has_quantized_embeddings(budget)  # on by default with a budget, and counted by it
    assert budget.matquant_budget["measured_bytes"] == resident_bytes(budget) == budget.matquant_budget[
        "predicted_bytes"]
    off, _ = matquant.load(ckpt, budget="10MB", quantize_embeddings=False)
    assert not qe.has_quantized_embeddings(off)


def test_resident_parts_add_up(ckpt):
    m, _ = matquant.load(ckpt, bits=4, keep_master=False, quantize_embeddings=True)
    parts = resident_bytes_by_part(m)
    assert parts["embeddings and head"] == 320 * 64 + 320 * 2
    assert parts["quantized layers"] > 0 and parts["other"] > 0
    assert sum(v for k, v in parts.items() if k != "total") == parts["total"] == resident_bytes(m)


@pytest.mark.skipif(not cpu_packed.available(), reason="torch has no CPU int4 kernel")
def test_generate_embeddings_option(ckpt, tiny_model_dir, capsys):
    args = ["generate", str(ckpt), "--bits", "4", "--drop-master", "--prompt", "The quick", "--max-new-tokens", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "int8 embeddings and head" in out and "embeddings and head 0.0" in out and "decode: 3 tokens" in out
    assert main(args + ["--embeddings", "fp32"]) == 0
    assert "fp32 embeddings and head" in capsys.readouterr().out
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "dog", "--max-new-tokens", "2",
                 "--embeddings", "int8"]) == 0
    assert "full precision), int8 embeddings and head" in capsys.readouterr().out


def test_saving_a_model_with_int8_embeddings_is_refused(tmp_path):
    from matquant.format.config import CheckpointError

    m = tiny_model("llama")
    qcfg = quantize_model(m, "rtn", group_size=32, scope="ffn", progress=False)
    qe.quantize_embeddings(m)
    with pytest.raises(CheckpointError, match="quantize_embeddings=False"):
        save_checkpoint(m, None, tmp_path / "ck", qcfg)
    assert not (tmp_path / "ck").exists()
