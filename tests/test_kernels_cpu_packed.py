"""The packed CPU runtime (kernels/cpu_packed.py + the 'packed' backend) equals the reference slice (up to bf16
rounding of activations, scales and zeros), declines what the int4 kernel cannot take with one warning, and holds
no dense weight of a quantized layer."""
import warnings

import pytest
import torch

import matquant
from matquant.kernels import cpu_packed, dispatch, packed_backend, torch_ref
from matquant.nn.linear import MatQuantLinear
from matquant.nn.memory import resident_tensors
from matquant.quant.minmax import quantize_minmax

from conftest import tiny_model

pytestmark = pytest.mark.skipif(not cpu_packed.available(), reason="torch has no CPU int4 kernel")


def _layer(out_f, in_f, group, bias, seed=0):
    torch.manual_seed(seed)
    qw = quantize_minmax(torch.randn(out_f, in_f) * 0.05, 8, group)
    return qw, MatQuantLinear.from_quantized(qw, torch.randn(out_f) * 0.1 if bias else None, slicing="paper")


def _close(y, ref, tol=1.2e-2):
    err = (y.float() - ref).abs().max().item()
    assert err <= tol * ref.abs().max().item(), f"max error {err:.3g} vs |ref| {ref.abs().max().item():.3g}"


@pytest.fixture(autouse=True)
def _reset():
    dispatch.reset_warnings()
    yield


@pytest.mark.parametrize("high_format", ["int4x2", "bf16"])
@pytest.mark.parametrize("out_f,in_f,group,bias", [(48, 256, 64, True), (80, 96, 32, False), (32, 384, 128, True),
                                                   (16, 576, 576, False)])  # last: per-channel as groups of 64
def test_packed_layer_equals_reference_slice(out_f, in_f, group, bias, high_format):
    qw, lin = _layer(out_f, in_f, group, bias)
    lin.set_backend("packed", high_format=high_format)
    xs = [torch.randn(1, in_f), torch.randn(17, in_f), torch.randn(2, 3, in_f)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here may fall back
        for mode in ("paper", "nested"):
            for bits in range(2, 9):
                lin.set_bits(bits, mode)
                w = torch_ref.dequantize_slice(qw.codes, qw.scales, qw.zeros, 8, bits, mode)
                for x in xs:
                    ref = x.bfloat16().float() @ w.t() + (lin.bias if bias else 0)
                    # two 4-bit planes are each dequantized in bf16 inside the kernel: up to ~1.4 % at r = 5
                    _close(lin(x), ref, tol=1.2e-2 if bits <= 4 or high_format == "bf16" else 2e-2)
                ps = lin.compute_backend.packed_slice(lin)
                lowbit_kind = f"int{bits}" if packed_backend.uses_lowbit(lin, bits, mode) else "int4"
                assert ps.kind == (lowbit_kind if bits <= 4 else high_format)


def test_bf16_and_noncontiguous_inputs():
    qw, lin = _layer(48, 128, 64, True)
    lin.set_backend("packed")
    lin.set_bits(3, "nested")
    w = torch_ref.dequantize_slice(qw.codes, qw.scales, qw.zeros, 8, 3, "nested")
    x = torch.randn(128, 5).t()  # non-contiguous
    assert not x.is_contiguous()
    _close(lin(x), x.bfloat16().float() @ w.t() + lin.bias)
    yb = lin(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    _close(yb, x.bfloat16().float() @ w.t() + lin.bias, tol=2e-2)


@pytest.mark.parametrize("case", ["out45", "group16", "extra", "float64"])
def test_declined_layer_falls_back_with_one_warning_and_right_answer(case):
    out_f, group = (45, 64) if case == "out45" else ((48, 16) if case == "group16" else (48, 64))
    qw, lin = _layer(out_f, 128, group, True)
    mode = "extra" if case == "extra" else "paper"
    lin.set_bits(3, mode)
    x = torch.randn(4, 128, dtype=torch.float64 if case == "float64" else torch.float32)
    ref = lin(x)  # torch reference path
    lin.set_backend("packed")
    with pytest.warns(RuntimeWarning, match="packed backend cannot handle") as rec:
        y1, y2 = lin(x), lin(x)
    assert sum("packed backend" in str(w.message) for w in rec) == 1
    torch.testing.assert_close(y1, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y2, ref, rtol=1e-5, atol=1e-5)


def _model(slicing="nested"):
    from matquant.algorithms import quantize_model

    model = tiny_model("llama")
    quantize_model(model, "rtn", group_size=32, scope="ffn+attn", slicing=slicing)
    return model


def test_no_dense_weight_of_a_quantized_layer_is_alive_after_forward():
    model = _model()
    ids = torch.randint(0, 320, (1, 9))
    for bits in (8, 4, 2):
        matquant.set_bits(model, bits)
        matquant.set_backend(model, "auto")  # CPU: the packed runtime
        with torch.no_grad():
            model(ids)
        for name, m in matquant.nn.matquant_modules(model).items():
            dense = [(n, tuple(t.shape), t.dtype) for n, t in resident_tensors(m)
                     if t.is_floating_point() and t.numel() >= m.out_features * m.in_features // 4]
            assert not dense, f"{name} at int{bits} holds {dense}"
            assert m.compute_backend.resident_precisions(), name  # and it did run packed
        assert "_cached" not in dict(m.derived_tensors())


def test_keep_precisions_and_lazy_repack():
    model = _model()
    ids = torch.randint(0, 320, (1, 6))
    refs = {}
    for b in (8, 4, 2):
        matquant.set_bits(model, b)
        with torch.no_grad():
            refs[b] = model(ids).logits
    matquant.set_backend(model, "packed", keep=[8, 4])
    lay = next(iter(matquant.nn.matquant_modules(model).values()))
    for b in (8, 4, 2, 8, 4):
        matquant.set_bits(model, b)
        with torch.no_grad():
            _close(model(ids).logits, refs[b], tol=3e-2)
    assert lay.compute_backend.resident_precisions() == [(4, "nested"), (8, "paper")]  # int2 was re-packed, then dropped
