"""rotate='residual' (issue 14): a Hadamard over the residual stream folded into the weights — exact in float,
nothing online, round trips through the checkpoint / from_pretrained, and exportable as plain weights."""
import json

import pytest
import torch

import matquant
from matquant.algorithms import quantize_model
from matquant.algorithms.residual_rotation import fold_residual_rotation
from matquant.format.checkpoint import load_checkpoint, save_checkpoint
from matquant.format.config import CheckpointError
from matquant.nn.bits import matquant_modules
from matquant.quant.rotation import make_spec, online_spec

from conftest import tiny_model

X = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(2))


def _logits(model):
    with torch.no_grad():
        return model(X).logits


def _rel(a, b):
    return ((a - b).abs().max() / a.abs().max()).item()


def _perturbed_norms(model):
    """Random RMSNorm scales (freshly initialised ones are all 1, which would not test their folding)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "qwen3"])
def test_fold_keeps_the_logits_and_leaves_norms_at_one(family):
    model = _perturbed_norms(tiny_model(family))
    ref = _logits(model)
    emb0 = model.get_input_embeddings().weight.detach().clone()
    fold_residual_rotation(model, seed=3)
    assert _rel(ref, _logits(model)) < 1e-4
    assert not model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    inner = model.model
    assert all(torch.all(layer.input_layernorm.weight == 1) and torch.all(layer.post_attention_layernorm.weight == 1)
               for layer in inner.layers) and torch.all(inner.norm.weight == 1)
    e = model.get_input_embeddings().weight.detach()
    assert not torch.allclose(e, emb0)  # really rotated ...
    assert torch.allclose(e.norm(dim=1), emb0.norm(dim=1), rtol=1e-5)  # ... by an orthogonal map


def test_unsupported_architectures_are_refused_before_any_change():
    model = tiny_model("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="rotate='residual' folds a rotation into pre-RMSNorm decoders.*'gpt2'"):
        quantize_model(model, "rtn", scope="ffn", group_size=32, progress=False, rotate="residual")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.fixture(scope="module")
def residual_ckpt(tmp_path_factory, tiny_tokenizer):
    model = _perturbed_norms(tiny_model("llama"))
    q = quantize_model(model, "gptq", scope="ffn+attn", group_size=32, calib=CALIB, progress=False,
                       rotate="residual", rotate_seed=1)
    d = tmp_path_factory.mktemp("residual") / "ck"
    save_checkpoint(model, tiny_tokenizer, d, q)
    return d, model, q


def test_spec_is_stored_and_nothing_runs_online(residual_ckpt):
    d, model, q = residual_ckpt
    assert q.rotation == {"mode": "residual", "kind": "hadamard", "seed": 1}
    stored = json.loads((d / "config.json").read_text())
    assert stored["quantization_config"]["rotation"] == q.rotation and stored["tie_word_embeddings"] is False
    assert online_spec(q.rotation) is None and make_spec("residual", 32, 1) == q.rotation
    assert all(m.rotation is None and m._input_rotation is None for m in matquant_modules(model).values())


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_round_trips_through_load_and_from_pretrained(residual_ckpt, bits):
    from transformers import AutoModelForCausalLM

    d, model, _ = residual_ckpt
    matquant.set_bits(model, bits)
    ref = _logits(model)
    loaded, _, _ = load_checkpoint(d, bits=bits)
    assert torch.allclose(_logits(loaded), ref, atol=1e-5, rtol=1e-5)
    hf = AutoModelForCausalLM.from_pretrained(d).eval()
    matquant.set_bits(hf, bits)
    assert torch.allclose(_logits(hf), ref, atol=1e-5, rtol=1e-5)
    matquant.set_bits(model, 8)


def test_int8_slice_is_close_to_the_unrotated_float_model(residual_ckpt):
    d, _, _ = residual_ckpt
    ref = _logits(_perturbed_norms(tiny_model("llama")))
    loaded, _, _ = load_checkpoint(d, bits=8)
    assert _rel(ref, _logits(loaded)) < 2e-2  # quantization error only: the rotation itself is exact


def test_exports_are_not_refused_and_the_dense_export_is_a_plain_model(residual_ckpt, tmp_path):
    from transformers import AutoModelForCausalLM

    from matquant.integrations.compressed_tensors_export import export_compressed_tensors, load_decompressed
    from matquant.integrations.export_slices import load_for_export

    d, _, _ = residual_ckpt
    model, tok, _ = load_for_export(d, 4)
    ref = _logits(model)
    export_compressed_tensors(model, tok, tmp_path / "ct", dtype=torch.float32)
    back = load_decompressed(tmp_path / "ct")
    assert torch.equal(back.lm_head.weight, model.lm_head.weight)  # the untied, rotated head is exported as is
    assert _rel(ref, _logits(back)) < 0.1  # the integer-zero grid's own rounding (tests/test_export_compressed_tensors)
    from matquant.cli import main

    assert main(["slice", str(d), "--bits", "4", "--out", str(tmp_path / "dense")]) == 0
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert not any(hasattr(m, "qweight") for m in plain.modules())
    assert _rel(ref, _logits(plain)) < 1e-4


def test_gguf_export_writes_the_untied_output_head(tmp_path, tiny_tokenizer):
    pytest.importorskip("gguf")
    from test_export_gguf import _read_back, tiny_llama, write_template

    from matquant.integrations.export_slices import load_for_export
    from matquant.integrations.gguf_export import export_gguf, read_tensor_types

    template = write_template(tiny_llama(320), tiny_tokenizer, tmp_path / "t.gguf")  # tied: no output tensor
    m = _perturbed_norms(tiny_llama(320))
    q = quantize_model(m, "rtn", scope="ffn+attn", group_size=64, progress=False, rotate="residual")
    save_checkpoint(m, tiny_tokenizer, tmp_path / "ck", q)
    model, tok, _ = load_for_export(tmp_path / "ck", 4)
    rep = export_gguf(model, tok, tmp_path / "r.gguf", template=template)
    assert "output.weight" in read_tensor_types(tmp_path / "r.gguf") and "output.weight" in rep.rewritten
    back = _read_back(tmp_path / "r.gguf")
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lm, lb = model(ids).logits, back(ids).logits
    assert (lm - lb).abs().max().item() / lm.abs().max().item() < 2e-3  # Q4_1 exact up to fp16 rounding


def test_a_matquant_without_the_mode_refuses_it(residual_ckpt, monkeypatch):
    import matquant.quant.rotation as R

    d, _, _ = residual_ckpt
    monkeypatch.setattr(R, "STORED_MODES", ("input", "block"))
    with pytest.raises(CheckpointError, match="rotation mode 'residual' is not known to this matquant"):
        matquant.load(d)
