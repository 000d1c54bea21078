"""The low-bit CPU runtime (kernels/lowbit.py + csrc/lowbit.cpp): int2/int3 slices held at 2 and 3 bits per weight.

The kernel quantizes activations to int8 per block (llama.cpp's design), so it is exact in this sense: it equals
F.linear(x̂, W_r) with x̂ the int8-rounded activations and (A, M) rounded to fp16, up to fp32 summation order
(asserted to 1e-5 of the output's max), and it stays within 1.5 % of the output's max of the fp32 reference slice
(the int4 path's bound for its bf16 rounding is 1.2 %). The C++ tests skip when the extension cannot be built here;
the no-compiler fallback is tested either way."""
import warnings

import pytest
import torch

from matquant.kernels import cpu_packed, dispatch, lowbit, packed_backend, torch_ref
from matquant.kernels.cpu import slice_codes_fast
from matquant.kernels.cpu_packed import left_aligned, pack4
from matquant.nn.linear import MatQuantLinear
from matquant.nn.memory import quantized_resident_bytes, resident_tensors
from matquant.quant.minmax import quantize_minmax

needs_kernel = pytest.mark.skipif(not lowbit.available(), reason="the low-bit C++ extension cannot be built here")


def _quantized(out_f, in_f, group, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return quantize_minmax(torch.randn(out_f, in_f, generator=gen) * 0.05, 8, group)


def _rel(a, b):
    return (a - b).abs().max().item() / b.abs().max().item()


def test_layout_round_trips_codes_and_params():
    for bits in lowbit.BITS:
        q = torch.randint(0, 2**bits, (80, 96), dtype=torch.uint8)  # 80 rows: one padded block
        codes, hbits = lowbit.pack_codes(q, bits)
        assert codes.shape == (2, 24, 64) and (hbits is None) == (bits == 2)
        ls = lowbit.LowbitSlice(bits, "paper", 80, 96, 32, codes, hbits, lowbit.make_params(
            torch.rand(80, 3), torch.randn(80, 3), bits))
        assert torch.equal(lowbit.unpack_codes(ls), q)
        assert ls.nbytes == lowbit.slice_bytes(80, 96, 32, bits)


@needs_kernel
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("mode", ["nested", "paper"])
@pytest.mark.parametrize("bits", [2, 3])
def test_kernel_equals_reference_slice(bits, mode, group):
    n, k = 80, 384  # a padded row block; 3, 6 or 12 groups
    qw = _quantized(n, k, group)
    ls = lowbit.pack_slice(qw.codes, qw.scales, qw.zeros, 8, bits, mode, group)
    assert torch.equal(lowbit.unpack_codes(ls), slice_codes_fast(qw.codes, 8, bits, mode).to(torch.uint8))
    w = torch_ref.dequantize_slice(qw.codes, qw.scales, qw.zeros, 8, bits, mode)
    paths = range(int(torch.ops.matquant_lowbit.isa()), -1, -1)  # AVX-512 VNNI / AVX2 / portable, as this CPU has
    for m in (1, 5, 8):
        x = torch.randn(m, k)
        exact = lowbit.reference_linear(x, ls)
        for isa in paths:
            y = lowbit.linear(x, ls, isa=isa)
            assert _rel(y, exact) < 1e-5, f"path {isa}"
        assert _rel(y, x @ w.t()) < 1.5e-2


@needs_kernel
def test_switch_from_master_planes_equals_packing_from_codes():
    assert lowbit.planes_convertible()
    for n in (128, 112):  # full blocks; a partial last block of 48 rows (torch packs it differently)
        qw = _quantized(n, 192, 64)
        hi = pack4(left_aligned(qw.codes, 8) >> 4)
        for bits in lowbit.BITS:
            a = lowbit.from_planes(hi, n, 192, qw.scales, qw.zeros, 8, bits, 64)
            b = lowbit.pack_slice(qw.codes, qw.scales, qw.zeros, 8, bits, "nested", 64)
            for ta, tb in zip(a.tensors(), b.tensors()):
                assert torch.equal(ta, tb)


@needs_kernel
def test_packed_backend_holds_int2_int3_at_their_size_and_switches():
    qw = _quantized(128, 256, 64)
    bias = torch.randn(128)
    lin = MatQuantLinear.from_quantized(qw, bias, slicing="nested")
    lin.set_backend("packed", keep=[2, 3, 4])
    lin.hold_master_packed()
    x = torch.randn(3, 256)
    for bits in (2, 3, 4, 2):
        lin.set_bits(bits)
        y = lin(x)
        ps = lin.compute_backend.packed_slice(lin)
        if bits in lowbit.BITS:
            assert isinstance(ps, lowbit.LowbitSlice) and ps.kind == f"int{bits}"
            assert _rel(y, lowbit.reference_linear(x, ps) + bias) < 1e-5
    slices = lin.compute_backend.slices
    assert slices[(2, "nested")].codes is slices[(3, "nested")].codes  # int3's 2-bit plane is the int2 slice
    # planes (8 bits/weight) + int4 tables + int2 (2.5 bits) + int3's bit plane and params + master scales/zeros
    n, k = 128, 256
    int4_tables = sum(t.numel() * 2 for _, t in slices[(4, "nested")].parts)
    expect = n * k + int4_tables + lowbit.slice_bytes(n, k, 64, 2) + lowbit.slice_bytes(n, k, 64, 3) - n * k // 4
    expect += 2 * qw.scales.numel() * 2 + n * 4
    assert quantized_resident_bytes(lin) == expect
    assert not [t for _, t in resident_tensors(lin) if t.is_floating_point() and t.numel() >= n * k // 4]


def test_odd_layers_are_declined_and_run_as_int4():
    assert lowbit.layer_reason(81, 256, 64, 2, "nested", 8) is not None  # odd rows
    assert lowbit.layer_reason(64, 96, 48, 2, "nested", 8) is not None  # group not a multiple of 32
    assert not lowbit.smaller_than_int4(16, 576, 64, 2)  # 16 rows padded to 64: no smaller than int4
    assert lowbit.smaller_than_int4(112, 576, 64, 3)
    assert lowbit.layer_reason(64, 256, 64, 4, "nested", 8) is not None  # int4 keeps its kernel
    assert lowbit.layer_reason(64, 256, 64, 3, "extra", 8) is not None
    assert lowbit.layer_reason(64, 256, 64, 3, "paper", 8) is None
    qw = _quantized(16, 576, 64)
    lin = MatQuantLinear.from_quantized(qw, None, slicing="nested")
    lin.set_backend("packed")
    lin.set_bits(2)
    y = lin(torch.randn(2, 576))
    assert not packed_backend.uses_lowbit(lin, 2, "nested")
    assert lin.compute_backend.packed_slice(lin).kind == "int4" and y.shape == (2, 16)


@pytest.fixture
def no_compiler(monkeypatch):
    def fail():
        raise OSError("no C++ compiler found")

    monkeypatch.setattr(lowbit, "_build", fail)
    monkeypatch.setattr(lowbit, "_loaded_already", lambda: False)
    lowbit.reset()
    dispatch.reset_warnings()
    yield
    monkeypatch.undo()
    lowbit.reset()


def test_without_a_compiler_int2_runs_in_the_int4_format_after_one_warning(no_compiler):
    qw = _quantized(128, 256, 64)
    lin = MatQuantLinear.from_quantized(qw, None, slicing="nested")
    lin.set_backend("packed")
    lin.set_bits(2)
    x = torch.randn(4, 256)
    with pytest.warns(RuntimeWarning, match="low-bit kernel unavailable.*no C\\+\\+ compiler") as rec:
        y = lin(x)
        lin(x)
    assert len([w for w in rec if "low-bit" in str(w.message)]) == 1
    assert lin.compute_backend.packed_slice(lin).kind == "int4"
    w = torch_ref.dequantize_slice(qw.codes, qw.scales, qw.zeros, 8, 2, "nested")
    assert _rel(y, x.bfloat16().float() @ w.t()) < 1.2e-2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not lowbit.available()  # no second warning
    with pytest.raises(RuntimeError, match="low-bit kernel is unavailable"):
        lowbit.linear(x, lowbit.pack_slice(qw.codes, qw.scales, qw.zeros, 8, 2, "nested", 64))


def test_env_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv(lowbit.ENV_SWITCH, "0")
    lowbit.reset()
    try:
        with pytest.warns(RuntimeWarning, match="MATQUANT_LOWBIT=0"):
            assert not lowbit.available()
    finally:
        monkeypatch.delenv(lowbit.ENV_SWITCH)
        lowbit.reset()
