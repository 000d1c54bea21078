"""Slice-own group parameters (`slice_params='own'`, gptq / matgptq): each served slice below the master reads its
unchanged codes with its own (α_r, z_r), fitted to its output error (quant/refit.refit_params, one fit per slice)."""
from __future__ import annotations

import json

import pytest
import torch

import matquant
from matquant.algorithms import quantize_model
from matquant.format.checkpoint import save_checkpoint
from matquant.format.config import CheckpointError
from matquant.quant.minmax import QuantizedWeight, dequantize, minmax_params, quantize_codes
from matquant.quant.refit import refit_params

X = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(2))


def _tiny(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def _logits(model):
    with torch.no_grad():
        return model(X).logits


def _slice_error(W, H, qw, r, mode="nested"):
    E = (W - dequantize(qw, r, mode)).double()
    return ((E @ H.double()) * E).sum(1)  # per row


@pytest.mark.parametrize("symmetric", [False, True])
def test_own_params_are_never_worse_per_row_and_keep_the_codes(symmetric):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 64, generator=g)
    Xc = torch.randn(300, 64, generator=g) * torch.linspace(0.1, 2, 64)
    H = Xc.T @ Xc
    s, z = minmax_params(W, 8, 16, symmetric, torch.float16)
    q = quantize_codes(W, s, z, 8)
    shared = QuantizedWeight(q, s.half(), z.half(), 8, 16)
    fits = refit_params(W, H, q, shared.scales.float(), shared.zeros.float(), master_bits=8, group_size=16,
                        slicing="nested", slices=(6, 4, 3, 2), symmetric=symmetric, param_dtype=torch.float16,
                        separate=True)
    assert sorted(fits) == [2, 3, 4, 6]
    own = {r: (s_.half(), z_.half()) for r, (s_, z_, _) in fits.items()}
    withown = QuantizedWeight(q, shared.scales, shared.zeros, 8, 16, own)
    for r in (6, 4, 3, 2):
        assert own[r][0].dtype == torch.float16 and own[r][0].shape == s.shape
        e0, e1 = _slice_error(W, H, shared, r), _slice_error(W, H, withown, r)
        assert (e1 <= e0 * (1 + 1e-9)).all()
        assert e1.sum() < 0.99 * e0.sum()  # the shared (α, z) are not the r-bit slice's least-squares optimum
    assert torch.equal(dequantize(withown, 8, "nested"), dequantize(shared, 8, "nested"))  # the master: shared
    with pytest.raises(ValueError, match="int9 is not a slice of the int8 master"):
        refit_params(W, H, q, s, z, master_bits=8, group_size=16, slicing="nested", slices=(9,), separate=True)


@pytest.fixture(scope="module")
def own_ckpt(tmp_path_factory, tiny_tokenizer):
    model = _tiny()
    qcfg = quantize_model(model, "matgptq", group_size=32, scope="ffn", calib=CALIB, progress=False,
                          slice_params="own")
    d = tmp_path_factory.mktemp("own") / "ckpt"
    save_checkpoint(model, tiny_tokenizer, d, qcfg)
    return d, model, qcfg


def test_matgptq_own_params_round_trip_every_backend_and_transformers(own_ckpt):
    from transformers import AutoModelForCausalLM

    d, model, qcfg = own_ckpt
    assert qcfg.slice_params == [2, 3, 4, 6] and qcfg.method_args["slice_params"] == "own"
    assert json.loads((d / "config.json").read_text())["quantization_config"]["slice_params"] == [2, 3, 4, 6]
    layer = model.get_submodule(qcfg.modules[0])
    assert layer.own_bits == (2, 3, 4, 6)
    assert not torch.equal(layer.group_params(2)[0], layer.scales)  # int2 reads its own scales
    assert layer.group_params(8)[0] is layer.scales
    assert layer.group_params(2, "paper")[0] is layer.scales  # fitted for nested: another slicing reads the shared
    hf = AutoModelForCausalLM.from_pretrained(d)
    loaded = {b: matquant.load(d, backend=b)[0] for b in ("torch", "cpu", "packed")}
    for bits in (8, 6, 4, 3, 2):
        matquant.set_bits(model, bits)
        want = _logits(model)
        for m in (hf, *loaded.values()):
            matquant.set_bits(m, bits)
        assert torch.equal(_logits(hf), want)
        assert torch.equal(_logits(loaded["torch"]), want)
        assert torch.allclose(_logits(loaded["cpu"]), want, atol=1e-5 * want.abs().max(), rtol=0)
        assert torch.allclose(_logits(loaded["packed"]), want, atol=3e-3 * want.abs().max(), rtol=0), bits


def test_own_params_keep_the_codes_and_fit_every_precision_to_its_own_error():
    """The first layer (same inputs either way): same codes; every slice, the master included, reads them with
    parameters that give a lower output error on that layer's calibration inputs than the shared ones."""
    base, own = _tiny(), _tiny()
    quantize_model(base, "gptq", group_size=32, scope="ffn", calib=CALIB, progress=False)
    qcfg = quantize_model(own, "gptq", group_size=32, scope="ffn", calib=CALIB, progress=False,
                          slice_params="own", zero_points="free")  # (integer master zeros: tests/test_integer_zero.py)
    assert qcfg.slice_params == [2, 3, 4, 6]
    n = qcfg.modules[0]
    a, b = base.get_submodule(n), own.get_submodule(n)
    assert torch.equal(a.qweight, b.qweight)
    ref = _tiny()
    xs = []
    h = ref.get_submodule(n).register_forward_pre_hook(lambda _m, inp: xs.append(inp[0].reshape(-1, 64)))
    with torch.no_grad():
        ref(CALIB)
    h.remove()
    X = torch.cat(xs)
    W = ref.get_submodule(n).weight.detach()
    for bits in (8, 6, 4, 3, 2):
        matquant.set_bits(base, bits)
        matquant.set_bits(own, bits)
        e_shared = ((W - a.dense_weight()) @ X.T).pow(2).sum()
        e_own = ((W - b.dense_weight()) @ X.T).pow(2).sum()
        assert e_own < e_shared, bits


def test_export_slices_read_the_own_params(own_ckpt):
    from matquant.integrations.export_slices import model_slices, plain_tensors

    _, model, qcfg = own_ckpt
    matquant.set_bits(model, 3)
    for name, st in model_slices(model).items():
        g = st.codes.float().reshape(st.codes.shape[0], -1, st.group_size)
        w = (g * st.a.unsqueeze(-1) + st.b.unsqueeze(-1)).reshape(st.codes.shape)
        assert torch.allclose(w, st.reference, atol=1e-5 * st.reference.abs().max()), name
    assert not any("_int" in k for k in plain_tensors(model))  # no slice-own tensor leaks into an export
    from matquant.format.export import plain_state_dict

    sd = plain_state_dict(model)
    assert not any("_int" in k or k.endswith((".qweight", ".scales", ".zeros")) for k in sd)
    name = qcfg.modules[0]
    assert torch.equal(sd[f"{name}.weight"], model.get_submodule(name).dense_weight(torch.float32))


def test_shared_checkpoints_do_not_write_the_field(tmp_path, tiny_tokenizer):
    model = _tiny()
    qcfg = quantize_model(model, "rtn", group_size=32, scope="ffn", progress=False)
    save_checkpoint(model, tiny_tokenizer, tmp_path / "c", qcfg)
    assert "slice_params" not in json.loads((tmp_path / "c" / "config.json").read_text())["quantization_config"]


def _edit(d, value):
    cfg = json.loads((d / "config.json").read_text())
    if value is None:
        del cfg["quantization_config"]["slice_params"]
    else:
        cfg["quantization_config"]["slice_params"] = value
    (d / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("value, match", [([8], "below master_bits 8"), ([4, 4], "distinct"), ("4", "list"),
                                          ([2, 3], "does not use"), (None, "does not use")])
def test_inconsistent_slice_params_are_checkpoint_errors(own_ckpt, tmp_path, value, match):
    import shutil

    d = tmp_path / "c"
    shutil.copytree(own_ckpt[0], d)
    _edit(d, value)
    with pytest.raises(CheckpointError, match=match):
        matquant.load(d)


def test_a_matquant_without_the_field_refuses_the_checkpoint(own_ckpt, monkeypatch):
    """What a matquant that predates slice_params says: the key is unknown to its QuantConfig."""
    from matquant.format.config import QuantConfig

    d = own_ckpt[0]
    q = json.loads((d / "config.json").read_text())["quantization_config"]
    fields = dict(QuantConfig.__dataclass_fields__)
    del fields["slice_params"]
    monkeypatch.setattr(QuantConfig, "__dataclass_fields__", fields)
    with pytest.raises(CheckpointError, match=r"unknown key\(s\) \['slice_params'\]; written by a newer matquant"):
        QuantConfig.from_dict(q)


def test_cli_slice_params_for_every_method_rtn_loads_calibration(tmp_path, tiny_model_dir):
    from matquant.cli import main

    for method, extra in (("rtn", []), ("gptq", [])):
        out = tmp_path / method
        assert main(["quantize", "--method", method, "--model", str(tiny_model_dir), "--out", str(out),
                     "--group-size", "32", "--calib-windows", "2", "--calib-seqlen", "32", "--slice-params", "own",
                     *extra]) == 0
        q = json.loads((out / "config.json").read_text())["quantization_config"]
        assert q["slice_params"] == [2, 3, 4, 6] and q["method_args"]["slice_params"] == "own"


def _block0_gate_hessian(model):
    """XᵀX of block 0's gate_proj inputs over CALIB in the unquantized model: what the post-pass sees there (no
    earlier target changes block 0's input)."""
    acc = []
    mod = model.model.layers[0].mlp.gate_proj
    h = mod.register_forward_pre_hook(lambda _m, inp: acc.append(inp[0].reshape(-1, inp[0].shape[-1]).double()))
    with torch.no_grad():
        for i in range(CALIB.shape[0]):
            model(CALIB[i:i + 1], use_cache=False)
    h.remove()
    x = torch.cat(acc)
    return x.T @ x


@pytest.mark.parametrize("method,kw", [("rtn", {}), ("rtn", {"clip": "mse"}),
                                       ("omniquant", {"epochs": 1}),
                                       ("qat", {"steps": 2, "batch_size_train": 1})])
def test_post_pass_keeps_the_codes_and_fits_each_slice(method, kw):
    """rtn / omniquant / qat: slice_params='own' is a pass after the method: the codes and everything the method
    chose stay as without it; every slice below the master gets (α_r, z_r) no worse per row on its calibration
    error (checked on block 0's gate_proj, whose inputs the pass sees unchanged)."""
    base = _tiny()
    H = _block0_gate_hessian(base)
    W = base.model.layers[0].mlp.gate_proj.weight.detach().clone()
    models = {}
    for sp in ("shared", "own"):
        m = _tiny()
        qcfg = quantize_model(m, method, group_size=32, scope="ffn", calib=CALIB, progress=False, slice_params=sp,
                              **kw)
        models[sp] = (m, qcfg)
    (ms, cs), (mo, co) = models["shared"], models["own"]
    assert cs.slice_params is None and co.slice_params == [2, 3, 4, 6]
    for n in cs.modules:
        a, b = ms.get_submodule(n), mo.get_submodule(n)
        assert torch.equal(a.qweight, b.qweight), n
    gs, go = ms.model.layers[0].mlp.gate_proj, mo.model.layers[0].mlp.gate_proj
    qs = QuantizedWeight(gs.qweight, gs.scales, gs.zeros, 8, 32)
    for r in (6, 4, 3, 2):
        so, zo = go.group_params(r, "nested")
        qo = QuantizedWeight(go.qweight, so, zo, 8, 32)
        e0, e1 = _slice_error(W, H, qs, r), _slice_error(W, H, qo, r)
        assert (e1 <= e0 * (1 + 1e-6) + 1e-12).all(), r
        assert e1.sum() < e0.sum(), r


def test_post_pass_needs_calibration_and_a_known_value():
    with pytest.raises(ValueError, match="needs calibration windows"):
        quantize_model(_tiny(), "rtn", group_size=32, scope="ffn", progress=False, slice_params="own")
    with pytest.raises(ValueError, match="unknown slice_params"):
        quantize_model(_tiny(), "rtn", group_size=32, scope="ffn", calib=CALIB, progress=False, slice_params="mine")


@pytest.mark.parametrize("method", ["rtn", "gptq", "matgptq"])
def test_zero_points_integer_refused_where_it_cannot_hold(method):
    """An explicit --zero-points integer that the layout cannot honour is one clear error at config time, not a
    silently free pair (symmetric: no zero point to move; bfloat16: the nested int4 grid 7.5 + 16k is not storable)."""
    from matquant.algorithms.recipes import resolve_config
    with pytest.raises(ValueError, match="symmetric"):
        resolve_config(method, zero_points="integer", symmetric=True)
    with pytest.raises(ValueError, match="bfloat16"):
        resolve_config(method, zero_points="integer", param_dtype="bfloat16")
    assert resolve_config(method, zero_points="integer").zero_points == "integer"
    assert resolve_config(method, param_dtype="bfloat16").zero_points == "master"  # the master's grid is storable
