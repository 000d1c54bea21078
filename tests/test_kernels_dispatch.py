"""Backend dispatch in MatQuantLinear: every backend gives the reference answer; unsupported calls fall back with a
one-time warning; bad input is one clear error."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # triton kernels on CPU tensors (must precede the triton import)

import warnings  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import matquant  # noqa: E402
from matquant.algorithms import quantize_model  # noqa: E402
from matquant.kernels import dispatch  # noqa: E402
from matquant.kernels.triton_backend import TritonBackend  # noqa: E402
from matquant.nn import MatQuantLinear  # noqa: E402
from matquant.quant.minmax import quantize_minmax  # noqa: E402

HAS_TRITON = dispatch.triton_available()
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed (pip install triton)")


def interp_ok():
    if not HAS_TRITON:
        return False
    from matquant.kernels import triton_gemv as tg
    return tg.INTERPRET or torch.cuda.is_available()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256)
    m = LlamaForCausalLM(cfg).eval()
    quantize_model(m, "rtn", master_bits=8, group_size=64, scope="ffn+attn", progress=False)
    return m


def logits(m, ids):
    with torch.no_grad():
        return m(ids).logits.float()


@pytest.fixture(autouse=True)
def _reset(model):
    dispatch.reset_warnings()
    yield
    matquant.set_backend(model, "torch")
    matquant.set_bits(model, 8, slicing="paper")


@pytest.mark.parametrize("mode", ["paper", "nested"])
def test_cpu_backend_matches_torch(model, mode):
    ids = torch.randint(0, 256, (2, 9))
    refs = {}
    for bits in (8, 4, 3, 2):
        matquant.set_bits(model, bits, slicing=mode)
        refs[bits] = logits(model, ids)
    matquant.set_backend(model, "cpu", cache_precisions=4)
    for bits in (8, 4, 3, 2, 4):
        matquant.set_bits(model, bits, slicing=mode)
        torch.testing.assert_close(logits(model, ids), refs[bits], rtol=1e-5, atol=1e-5)
    # all four precisions stay cached per layer: switching back is free
    layer = next(iter(matquant.nn.matquant_modules(model).values()))
    assert len(layer.compute_backend.weights) == 4


def test_mixed_precision_map_cpu(model):
    ids = torch.randint(0, 256, (1, 7))
    matquant.set_bits(model, {"*mlp*": 2, "*self_attn*": 6}, slicing="nested")
    ref = logits(model, ids)
    matquant.set_backend(model, "cpu")
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-5, atol=1e-5)
    matquant.set_backend(model, "auto")  # CPU tensors -> the packed int4 runtime (bf16 activations)
    torch.testing.assert_close(logits(model, ids), ref, rtol=0, atol=2e-2 * ref.abs().max().item())


@needs_triton
def test_triton_fp32_model_falls_back_with_one_warning(model):
    ids = torch.randint(0, 256, (1, 5))
    matquant.set_bits(model, 4, slicing="nested")
    ref = logits(model, ids)
    matquant.set_backend(model, "triton")
    with pytest.warns(RuntimeWarning, match="float32") as rec:
        out = logits(model, ids)
        out2 = logits(model, ids)
    assert sum("float32" in str(w.message) for w in rec) == 1  # one warning for 14 layers x 2 forwards
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(out2, ref)


def _layer(group_size=64, out_f=45, in_f=192, bias=True):
    torch.manual_seed(1)
    qw = quantize_minmax(torch.randn(out_f, in_f) * 0.05, 8, group_size)
    return MatQuantLinear.from_quantized(qw, torch.randn(out_f) if bias else None)


@pytest.mark.skipif(not interp_ok(), reason="needs triton and a GPU or TRITON_INTERPRET=1 before triton import")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_layer_matches_reference(dtype):
    lin = _layer()
    x = torch.randn(3, 4, 192).to(dtype)  # 12 tokens: kernel path
    for bits, mode in [(2, "nested"), (3, "paper"), (8, "paper")]:
        lin.set_bits(bits, mode)
        lin.set_backend("torch")
        ref = lin(x).float()
        lin.set_backend("triton")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the kernel path must not fall back here
            got = lin(x).float()
        ulp = 2.0**-10 if dtype == torch.float16 else 2.0**-7
        torch.testing.assert_close(got, ref, rtol=4 * ulp, atol=4 * ulp * ref.abs().max().item())


@pytest.mark.skipif(not interp_ok(), reason="needs triton and a GPU or TRITON_INTERPRET=1 before triton import")
def test_triton_layout_packed_is_accepted_and_changes_nothing():
    """The chunked 2|2|4 copy for Triton was removed (one packed master layout): layout='packed' still works,
    warns once, and gives the same bits as the master layout."""
    lin = _layer()
    lin.set_bits(2, "nested")
    x = torch.randn(2, 192).half()
    lin.set_backend("triton", layout="master")
    y = lin(x)
    dispatch.reset_warnings()
    with pytest.warns(FutureWarning, match=r"layout='packed'\) is ignored"):
        lin.set_backend("triton", layout="packed")
    assert torch.equal(lin(x), y)


@pytest.mark.skipif(not interp_ok(), reason="needs triton and a GPU or TRITON_INTERPRET=1 before triton import")
def test_triton_prefill_and_unsupported_group_fall_back_correctly():
    lin = _layer()
    lin.set_bits(4, "nested")
    x = torch.randn(40, 192).half()  # > 16 tokens: dequantize + dense matmul (by design, no warning)
    ref = lin(x)
    lin.set_backend("triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(lin(x), ref)
    small = _layer(group_size=8, out_f=5, in_f=16)  # group size 8 < 16: declined, warned once
    small.set_bits(2, "paper")
    xs = torch.randn(1, 16).half()
    ref = small(xs)
    small.set_backend("triton")
    with pytest.warns(RuntimeWarning, match="group size 8"):
        torch.testing.assert_close(small(xs), ref)


def test_state_reset_after_load_state_dict():
    lin = _layer()
    lin.set_backend("cpu", cache_precisions=2)
    x = torch.randn(2, 192)
    lin(x)
    other = _layer()
    other.qweight.copy_(255 - other.qweight)
    lin.load_state_dict(other.state_dict())
    torch.testing.assert_close(lin(x), other(x))


def test_torch_backend_is_default_and_unchanged():
    lin = _layer()
    assert lin.backend == "torch"
    x = torch.randn(2, 192)
    w = lin.dequantized_weight(x.dtype)
    torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, w, lin.bias))
    assert "backend" not in repr(lin)


def test_bad_backend_inputs(model):
    with pytest.raises(ValueError, match="unknown backend"):
        matquant.set_backend(model, "cuda")
    with pytest.raises(ValueError, match="cache_precisions"):
        matquant.set_backend(model, "cpu", cache_precisions=-1)
    with pytest.raises(ValueError, match="unknown layout"):
        matquant.set_backend(model, "triton" if HAS_TRITON else "cpu", layout="planes")
    with pytest.raises(ValueError, match="no MatQuantLinear"):
        matquant.set_backend(torch.nn.Sequential(torch.nn.Linear(2, 2)), "cpu")


def test_triton_missing_is_clear_error(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    with pytest.raises(ValueError, match="pip install triton"):
        _layer().set_backend("triton")


@needs_triton
def test_auto_on_cuda_declined_call_uses_fast_path_silently():
    # what 'auto' does on CUDA for a call the kernel does not take (fp32): the cpu path, no warning
    lin = _layer()
    lin.set_bits(3, "nested")
    x = torch.randn(2, 192)
    ref = lin(x)
    lin.set_backend("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(TritonBackend(quiet=True).forward(lin, x), ref, rtol=1e-5, atol=1e-5)


def test_backend_objects_hold_what_memory_counts():
    """One backend object per layer (issue 25): set_backend builds it, options persist across calls unless given,
    and what it holds (resident_tensors) is what nn.memory counts; the layer keeps no backend state of its own."""
    from matquant.kernels.backend import Backend
    from matquant.nn.memory import quantized_resident_bytes

    lin = _layer(bias=False)
    lin.set_backend("torch")
    assert type(lin.compute_backend) is Backend and lin.backend == "torch"
    lin.set_backend("cpu", cache_precisions=2)
    base = quantized_resident_bytes(lin)
    x = torch.randn(2, 192)
    for bits in (8, 4, 2):
        lin.set_bits(bits)
        lin(x)
    held = list(lin.compute_backend.resident_tensors())
    assert len(held) == 2 and all(t.shape == (lin.out_features, lin.in_features) for _, t in held)
    assert quantized_resident_bytes(lin) == base + 2 * lin.out_features * lin.in_features * 4
    lin.set_backend("cpu")  # cache_precisions not given: kept
    assert lin.compute_backend.options.cache_precisions == 2 and not list(lin.compute_backend.resident_tensors())
    with pytest.raises(ValueError, match="keep bits"):
        lin.set_backend("packed", keep=[9])
    assert lin.backend == "cpu"  # a refused call changes nothing
