"""Input rotations (issue 14): the transform, rotate= for every method, checkpoint / from_pretrained round trips."""
import json

import pytest
import torch

import matquant
from matquant.algorithms import METHODS, quantize_model
from matquant.algorithms.rotate import rotated_targets
from matquant.format.checkpoint import load_checkpoint, save_checkpoint
from matquant.format.config import CheckpointError
from matquant.format.config import QuantConfig
from matquant.models.targets import find_targets
from matquant.quant.hadamard import apply_hadamard, random_signs
from matquant.quant.rotation import RotationSpecError, check_spec, input_rotation, make_spec


def _tiny(seed=0, hidden=48, inter=96):
    """A 2-block Llama with non-power-of-two widths (48 = H12⊗H4, 96 = H12⊗H8), like SmolLM2's 576 / 1536."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=320, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


X = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(2))
FAST = {"rtn": {}, "gptq": {}, "matgptq": {}, "omniquant": {"epochs": 1}, "qat": {"steps": 2, "save_every": 0}}


def _logits(model):
    with torch.no_grad():
        return model(X).logits


@pytest.mark.parametrize("n", [48, 64, 96, 576, 1536])
@pytest.mark.parametrize("mode", ["input", "block"])
def test_transform_is_exactly_orthogonal(n, mode):
    rot = input_rotation(make_spec(mode, 16 if n < 64 or n == 96 else 64, seed=3), n)
    eye = torch.eye(n, dtype=torch.float64)
    v = rot(eye)  # rows: e_i·V
    assert torch.allclose(v @ v.t(), eye, atol=1e-12, rtol=0)
    x = torch.randn(4, n)
    assert torch.allclose(rot.inverse(rot(x)), x, atol=2e-6, rtol=0)  # fp32 rounding
    if mode == "input":  # the definition: x·V = (x ⊙ signs)·Hᵀ/√n with H = quant.hadamard's H_n
        assert torch.allclose(rot(x), apply_hadamard(x * random_signs(n, 3)), atol=2e-6, rtol=0)
    w = torch.randn(5, n)
    assert torch.allclose(rot(x) @ rot.rotate_weight(w).t(), x @ w.t(), atol=1e-4, rtol=0)
    assert torch.allclose(rot.unrotate_weight(rot.rotate_weight(w)), w, atol=1e-6, rtol=0)


def test_rotated_unquantized_model_gives_the_unrotated_logits():
    model = _tiny()
    ref = _logits(model)
    targets = find_targets(model, "ffn+attn")
    for mode in ("input", "block"):
        with rotated_targets(model, targets, make_spec(mode, 16)):
            got = _logits(model)
            assert not torch.equal(model.model.layers[0].mlp.up_proj.weight, _tiny().model.layers[0].mlp.up_proj.weight)
        assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
        with torch.no_grad():  # undo by hand (quantize_model replaces the layers instead)
            for n in targets:
                m = model.get_submodule(n)
                m.weight.copy_(input_rotation(make_spec(mode, 16), m.in_features).unrotate_weight(m.weight))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_rotates_and_round_trips(method, tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = _tiny()
    ref = _logits(model)
    seen = []

    def at_int8(step, m):  # QAT's fake-quantized model after a step, read at its int8 slice
        from matquant.algorithms.training.fake_quant import FakeQuantLinear

        for layer in m.modules():
            if isinstance(layer, FakeQuantLinear):
                layer.bits = 8
        seen.append(_logits(m))
    extra = {"step_callback": at_int8} if method == "qat" else {}
    qcfg = quantize_model(model, method, group_size=16, scope="ffn+attn", calib=CALIB, progress=False,
                          rotate="input", rotate_seed=5, **FAST[method], **extra)
    for lg in seen:  # QAT swaps in its own layers: they must rotate their input too (the rotated weights need it)
        assert (lg - ref).abs().max() <= 0.05 * ref.abs().max()
    assert qcfg.rotation == {"mode": "input", "kind": "hadamard", "seed": 5}
    assert all(model.get_submodule(n).rotation == qcfg.rotation for n in qcfg.modules)
    assert not any(m._forward_pre_hooks for m in model.modules())  # the quantization-time hooks are gone
    matquant.set_bits(model, 8)
    q8 = _logits(model)
    assert (q8 - ref).abs().max() <= 0.05 * ref.abs().max()  # int8 of the rotated weights, run on rotated inputs
    d = tmp_path / "ckpt"
    save_checkpoint(model, tiny_tokenizer, d, qcfg)
    assert json.loads((d / "config.json").read_text())["quantization_config"]["rotation"] == qcfg.rotation
    loaded, _ = matquant.load(d, backend="torch")
    hf = AutoModelForCausalLM.from_pretrained(d)
    for b in (8, 4, 2):
        for m in (model, loaded, hf):
            matquant.set_bits(m, b)
        want = _logits(model)
        assert torch.equal(_logits(loaded), want)
        assert torch.equal(_logits(hf), want)
    with torch.inference_mode():  # what `matquant eval` runs under (inference tensors have no version counter)
        assert torch.equal(loaded(X).logits, want)


def test_block_mode_every_backend_and_dense_export(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = _tiny(hidden=64, inter=192)  # group 32: the packed int4 kernel's smallest; 192 = H12⊗H16
    ref = _logits(model)
    qcfg = quantize_model(model, "rtn", group_size=32, scope="ffn", rotate="block", progress=False,
                          param_dtype="float32")
    assert qcfg.rotation == {"mode": "block", "kind": "hadamard", "seed": 0, "block_size": 32}
    assert (_logits(model) - ref).abs().max() <= 0.05 * ref.abs().max()
    d = tmp_path / "ckpt"
    save_checkpoint(model, tiny_tokenizer, d, qcfg)
    matquant.set_bits(model, 4)
    want = _logits(model)
    for backend, tol in (("torch", 1e-6), ("cpu", 1e-5), ("packed", 3e-3)):  # packed: its int4 kernel's own
        m, _ = matquant.load(d, bits=4, backend=backend)                         # rounding (7e-4 unrotated too)
        assert torch.allclose(_logits(m), want, atol=tol * want.abs().max(), rtol=0), backend
    # a plain dense export folds the rotation back into the weights: stock transformers, same logits
    from matquant.format.export import export_dequantized

    export_dequantized(model, tiny_tokenizer, tmp_path / "dense")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert torch.allclose(_logits(plain), want, atol=1e-4 * want.abs().max(), rtol=0)


def test_unrotated_checkpoints_do_not_write_the_field(tmp_path, tiny_tokenizer):
    model = _tiny()
    qcfg = quantize_model(model, "rtn", group_size=16, progress=False)
    assert qcfg.rotation is None and "rotation" not in qcfg.to_dict()  # older matquant still reads it
    save_checkpoint(model, tiny_tokenizer, tmp_path / "c", qcfg)
    assert "rotation" not in json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]
    assert load_checkpoint(tmp_path / "c")[2].rotation is None


@pytest.mark.parametrize("kw, match", [
    ({"rotate": "both"}, "unknown rotation 'both'; choose one of none, input, block"),
    ({"rotate": "block", "group_size": -1}, "needs a positive group size"),
    ({"rotate": "input", "rotate_seed": -1}, "seed must be a non-negative integer"),
    ({"rotate": "input", "method": "omniquant", "let": True, "epochs": 0}, "LET"),
])
def test_bad_rotate_argument_is_a_clear_error_before_any_work(kw, match):
    model = _tiny()
    kw = {"group_size": 16, **kw}
    method = kw.pop("method", "rtn")
    with pytest.raises(ValueError, match=match):
        quantize_model(model, method, calib=CALIB, progress=False, **kw)
    assert not any(hasattr(m, "qweight") for m in model.modules())


@pytest.mark.parametrize("spec, match", [
    ("input", "must be null or a JSON object"),
    ({"mode": "spinquant", "kind": "hadamard", "seed": 0}, "mode 'spinquant' is not known.*newer matquant"),
    ({"mode": "residual", "kind": "hadamard", "seed": 0, "block_size": 64}, r"unknown key\(s\) \['block_size'\]"),
    ({"mode": "input", "kind": "spinquant", "seed": 0}, "kind 'spinquant' is not known.*newer matquant"),
    ({"mode": "input", "kind": "hadamard", "seed": 0, "matrix": [1]}, r"unknown key\(s\) \['matrix'\]"),
    ({"mode": "input", "kind": "hadamard"}, r"missing key\(s\) \['seed'\]"),
    ({"mode": "input", "kind": "hadamard", "seed": True}, "seed must be a non-negative integer"),
    ({"mode": "block", "kind": "hadamard", "seed": 0, "block_size": 0}, "block_size must be a positive"),
    ({"mode": "block", "kind": "hadamard", "seed": 0, "block_size": 43}, "no Hadamard construction of size 43"),
])
def test_malformed_spec_is_a_clear_error(spec, match):
    with pytest.raises(RotationSpecError, match=match):
        check_spec(spec)
    with pytest.raises(CheckpointError, match=match):
        QuantConfig(modules=["a"], rotation=spec).validate()


@pytest.fixture
def rotated_ckpt(tmp_path, tiny_tokenizer):
    model = _tiny()
    qcfg = quantize_model(model, "rtn", group_size=16, rotate="input", progress=False)
    d = tmp_path / "ckpt"
    save_checkpoint(model, tiny_tokenizer, d, qcfg)
    return d, model


def _edit_rotation(d, rotation):
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["rotation"] = rotation
    (d / "config.json").write_text(json.dumps(cfg))


def test_rotation_from_a_newer_matquant_fails_clearly(rotated_ckpt):
    from transformers import AutoModelForCausalLM

    d, _ = rotated_ckpt
    _edit_rotation(d, {"mode": "input", "kind": "quip-e8", "seed": 0})
    for load in (lambda: matquant.load(d), lambda: AutoModelForCausalLM.from_pretrained(d)):
        with pytest.raises(CheckpointError, match="kind 'quip-e8' is not known to this matquant.*newer matquant"):
            load()


def test_block_size_that_does_not_fit_the_layers_is_a_checkpoint_error(rotated_ckpt):
    d, _ = rotated_ckpt
    _edit_rotation(d, {"mode": "block", "kind": "hadamard", "seed": 0, "block_size": 32})  # 32 ∤ 48
    with pytest.raises(CheckpointError, match="block_size 32 does not divide in_features 48"):
        matquant.load(d)


def test_exporters_refuse_an_online_rotation(rotated_ckpt, tmp_path):
    from matquant.integrations.compressed_tensors_export import export_compressed_tensors
    from matquant.integrations.export_slices import ExportError
    from matquant.integrations.gguf_export import export_gguf

    d, model = rotated_ckpt
    for export in (export_gguf, export_compressed_tensors):
        with pytest.raises(ExportError, match="online input rotation.*--rotate none"):
            export(model, None, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_cli_rotate_quantize_slice_export(tmp_path, tiny_model_dir, capsys):
    from matquant.cli import main

    ck = tmp_path / "ck"
    assert main(["quantize", "--method", "rtn", "--model", str(tiny_model_dir), "--out", str(ck), "--group-size", "32",
                 "--rotate", "block", "--rotate-seed", "7"]) == 0
    q = json.loads((ck / "config.json").read_text())["quantization_config"]
    assert q["rotation"] == {"mode": "block", "kind": "hadamard", "seed": 7, "block_size": 32}
    assert main(["export", str(ck), "--bits", "4", "--format", "gguf", "--out", str(tmp_path / "x.gguf")]) == 1
    assert "--rotate none" in capsys.readouterr().err
    assert main(["quantize", "--method", "rtn", "--model", str(tiny_model_dir), "--out", str(tmp_path / "c2"),
                 "--group-size", "-1", "--rotate", "block"]) == 1
    assert "needs a positive group size" in capsys.readouterr().err
