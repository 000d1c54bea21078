"""compressed-tensors export: the folder is read back by the compressed-tensors package + transformers (decompressed
on CPU) and compared with matquant's slice; exact where the integer zero point is; config as llm-compressor writes it."""
from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("compressed_tensors")

from conftest import tiny_model  # noqa: E402

from matquant.algorithms import quantize_model  # noqa: E402
from matquant.format.checkpoint import save_checkpoint  # noqa: E402
from matquant.integrations.compressed_tensors_export import export_compressed_tensors, load_decompressed  # noqa: E402
from matquant.integrations.export_slices import ExportError, load_for_export  # noqa: E402
from matquant.nn.bits import matquant_modules  # noqa: E402


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("ct")
    out = {}
    m = tiny_model("llama")
    out["g32"] = save_checkpoint(m, tiny_tokenizer, d / "g32", quantize_model(m, "rtn", scope="ffn+attn", group_size=32,
                                                                             slicing="nested", progress=False))
    m = tiny_model("llama")
    q = quantize_model(m, "rtn", scope="ffn+attn", group_size=32, slicing="extra", progress=False)
    for mod in matquant_modules(m).values():  # integer zero points: the int8 slice is exactly representable
        mod.zeros.copy_(mod.zeros.float().round().clamp(0, 255).to(mod.zeros.dtype))
    out["intzero"] = save_checkpoint(m, tiny_tokenizer, d / "intzero", q)
    return out


def _read_back(path):
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32,
                                                quantization_config=CompressedTensorsConfig(dequantize=True)).eval()


def _logit_gap(model, back):
    torch.manual_seed(1)
    ids = torch.randint(0, 320, (2, 24))
    with torch.no_grad():
        a, b = model(ids).logits, back(ids).logits
    return ((a - b).abs().max() / a.abs().max()).item()


def _weights_match_report(model, back, rep):
    for m in rep.modules:
        ref = model.get_submodule(m.module).dequantized_weight(torch.float32)
        got = back.get_submodule(m.module).weight.detach()
        rms = (got - ref).pow(2).mean().sqrt().item()
        assert abs(rms - m.rms_error) <= 1e-3 * m.rms_error + 1e-7, m.module


def test_int4_round_trip_and_llm_compressor_config(ckpts, tmp_path):
    model, tok, _ = load_for_export(ckpts["g32"], 4)
    out = tmp_path / "w4"
    rep = export_compressed_tensors(model, tok, out, dtype=torch.float32)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    assert qc["quantization_status"] == "compressed" and qc["ignore"] == ["lm_head"]
    (g,) = qc["config_groups"].values()
    w = g["weights"]
    assert (w["num_bits"], w["strategy"], w["symmetric"], w["group_size"], w["type"]) == (4, "group", False, 32, "int")
    assert len(g["targets"]) == 14
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        zp = f.get_tensor("model.layers.0.mlp.gate_proj.weight_zero_point")
        packed = f.get_tensor("model.layers.0.mlp.gate_proj.weight_packed")
    assert zp.dtype == torch.int32 and zp.shape == (128 * 4 // 32, 64 // 32)  # packed along the output dim
    assert packed.dtype == torch.int32 and packed.shape == (128, 64 * 4 // 32)
    assert (out / "tokenizer.json").exists()
    back = _read_back(out)
    _weights_match_report(model, back, rep)
    # fractional zero points (ours) -> nearest integer-zero grid: a stated, measured bound (docs/export.md)
    assert max(m.rel_rms_error for m in rep.modules) < 0.15
    assert _logit_gap(model, back) < 0.1


def test_pack_bits_shrinks_the_error(ckpts, tmp_path):
    model, tok, _ = load_for_export(ckpts["g32"], 2)
    r2 = export_compressed_tensors(model, tok, tmp_path / "a", dtype=torch.float32)
    r8 = export_compressed_tensors(model, tok, tmp_path / "b", dtype=torch.float32, pack_bits=8)
    e2, e8 = (max(m.rel_rms_error for m in r.modules) for r in (r2, r8))
    assert e8 < e2 / 20  # 85 grid steps per slice step instead of 1
    assert _logit_gap(model, _read_back(tmp_path / "b")) < 0.02


def test_integer_zero_points_are_exact(ckpts, tmp_path):
    model, tok, _ = load_for_export(ckpts["intzero"], 8)
    rep = export_compressed_tensors(model, tok, tmp_path / "w8", dtype=torch.float32)
    assert all(m.exact_groups == 1.0 for m in rep.modules)
    assert max(m.max_error for m in rep.modules) < 1e-6
    assert _logit_gap(model, _read_back(tmp_path / "w8")) < 1e-5


def test_bits_map_becomes_config_groups(ckpts, tmp_path):
    model, tok, _ = load_for_export(ckpts["g32"], {"*.down_proj": 8, ".*": 4})
    rep = export_compressed_tensors(model, tok, tmp_path / "mix", dtype=torch.float32)
    groups = json.loads((tmp_path / "mix" / "config.json").read_text())["quantization_config"]["config_groups"]
    by_bits = {g["weights"]["num_bits"]: g["targets"] for g in groups.values()}
    assert sorted(by_bits) == [4, 8] and by_bits[8] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    assert rep.config_groups == 2 and rep.unfusable == []
    back = load_decompressed(tmp_path / "mix")  # each module with its own group's scheme
    _weights_match_report(model, back, rep)
    assert _logit_gap(model, back) < 0.1
    split = export_compressed_tensors(*load_for_export(ckpts["g32"], {"*.gate_proj": 8, ".*": 4})[:2],
                                      tmp_path / "split", dtype=torch.float32)
    assert split.unfusable and "vLLM will refuse" in split.summary()


def test_bad_input_leaves_nothing(ckpts, tmp_path):
    model, tok, _ = load_for_export(ckpts["intzero"], 4)  # extra slicing: 17 levels do not fit 4-bit codes
    with pytest.raises(ExportError, match="17 levels"):
        export_compressed_tensors(model, tok, tmp_path / "x")
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError, match="already exists"):
        export_compressed_tensors(model, tok, tmp_path / "exists", pack_bits=8)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists"]


def test_lsq_zero_fit_never_worse_than_search(ckpts, tmp_path):
    from matquant.integrations.compressed_tensors_export import integer_zero_fit
    from matquant.integrations.export_slices import model_slices

    model, tok, _ = load_for_export(ckpts["g32"], 4)
    g = 32
    gains = []
    for st in model_slices(model).values():
        errs = {}
        for fit in ("search", "lsq"):
            s, z, q, _ = integer_zero_fit(st, torch.float32, fit=fit)
            w = s.double().repeat_interleave(g, 1) * (q.double() - z.double().repeat_interleave(g, 1))
            errs[fit] = ((w - st.reference.double()) ** 2).reshape(w.shape[0], -1, g).sum(-1)
        assert (errs["lsq"] <= errs["search"] * (1 + 1e-9) + 1e-18).all(), st.module  # per group, never worse
        gains.append(errs["lsq"].sum() / errs["search"].sum())
    assert max(gains) < 0.98  # and it does lower the squared error (SmolLM2 int4: 8.4 % -> 7.5 % rms)
    # the folder written with fit="lsq" is read back by transformers with the reported error
    rep = export_compressed_tensors(model, tok, tmp_path / "lsq", dtype=torch.float32, fit="lsq")
    _weights_match_report(model, _read_back(tmp_path / "lsq"), rep)
    with pytest.raises(ExportError, match="unknown zero-point fit"):
        export_compressed_tensors(model, tok, tmp_path / "bad", fit="nope")
    assert not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def integer_ckpt(tmp_path_factory, tiny_tokenizer):
    """Integer zero points for the master and the int4 slice, with slice-own parameters (--recipe quality
    --zero-points integer)."""
    m = tiny_model("llama")
    calib = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(2))
    q = quantize_model(m, "matgptq", scope="ffn+attn", group_size=32, calib=calib, slice_params="own",
                       zero_points="integer", progress=False)
    return save_checkpoint(m, tiny_tokenizer, tmp_path_factory.mktemp("ctint") / "ckpt", q)


@pytest.mark.parametrize("bits", [8, 4])
def test_integer_zero_checkpoint_exports_exactly(integer_ckpt, tmp_path, bits):
    """Every group on the grid: written without a fit, and compressed-tensors' own decompression of the file is
    matquant's slice up to the fp16 rounding of the scale·(q − zp) product (the scales themselves are exact)."""
    from matquant.integrations.compressed_tensors_export import _decompressed_weight, _schemes_and_tensors
    from matquant.integrations.compressed_tensors_fit import integer_zero_fit
    from matquant.integrations.export_slices import model_slices
    from matquant.quant.slicing import slice_master

    model, tok, _ = load_for_export(integer_ckpt, bits)
    out = tmp_path / f"w{bits}"
    rep = export_compressed_tensors(model, tok, out)  # the default: float16 scales
    assert all(m.exact_groups == 1.0 for m in rep.modules) and f"{len(rep.modules)} exact" in rep.summary()
    schemes, tensors = _schemes_and_tensors(out)
    for name, mod in matquant_modules(model).items():
        ref = mod.dequantized_weight(torch.float32).double()
        a, _ = (x.float() for x in mod.group_params(bits))
        scale = tensors[f"{name}.weight_scale"]
        assert torch.equal(scale.float(), a * 2 ** (8 - bits))  # the slice's own A, exactly
        back = _decompressed_weight(tensors, name, schemes[name]).double()
        # up to fp16 rounding of each product (|w| ≤ max|w|): half an fp16 ulp, relative 2^-11
        assert (back - ref).abs().max() <= 2**-11 * ref.abs().max() * 1.01, name
    # the integers written, in float64: scale·(q − zp) IS α·(S_r(q) − z) of the checkpoint, bit for bit
    for name, st in model_slices(model).items():
        s, zp, q, exact = integer_zero_fit(st, torch.float16)
        g = st.group_size
        ct = s.double().repeat_interleave(g, 1) * (q.double() - zp.double().repeat_interleave(g, 1))
        alpha, z = (x.double().repeat_interleave(g, 1) for x in model.get_submodule(name).group_params(bits))
        master = model.get_submodule(name).master_codes()
        assert torch.equal(ct, alpha * (slice_master(master, 8, bits, "nested").double() - z)), name
    back = _read_back(out)
    assert _logit_gap(model, back) < 2e-3
