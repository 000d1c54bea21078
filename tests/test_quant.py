"""Property-based tests of the pure quantization math."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matquant.quant.minmax import dequantize, quantize_minmax
from matquant.quant.rounding import round_half_up
from matquant.quant.slicing import (codes_to_master_units, effective_code_bits, overflow_fraction, slice_codes,
                                    slice_master, slice_master_ste)

codes8 = st.lists(st.integers(0, 255), min_size=1, max_size=64).map(lambda v: torch.tensor(v, dtype=torch.uint8))
bits = st.integers(1, 8)
modes = st.sampled_from(["paper", "nested", "extra"])


def test_round_half_up_is_not_bankers():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])
    assert round_half_up(x).tolist() == [1.0, 2.0, 3.0, 0.0, -1.0]
    assert torch.round(x).tolist() != round_half_up(x).tolist()


@given(codes8, modes)
def test_full_precision_slice_is_identity(q, mode):
    assert torch.equal(slice_codes(q, 8, 8, mode), q.int())
    assert torch.equal(slice_master(q, 8, 8, mode), q.float())


@given(codes8, bits)
def test_paper_slice_matches_formula(q, r):
    s = 2 ** (8 - r)
    expected = torch.clamp(torch.floor(q.double() / s + 0.5), 0, 2**r - 1) * s
    assert torch.equal(slice_master(q, 8, r, "paper").double(), expected)


@given(codes8, bits)
def test_nested_slice_is_bit_prefix_and_bucket_centre(q, r):
    qr = slice_codes(q, 8, r, "nested")
    assert torch.equal(qr, (q.int() >> (8 - r)))
    s = 2 ** (8 - r)
    v = slice_master(q, 8, r, "nested")
    # the value is the centre of the bucket of master codes sharing that prefix
    assert torch.all(v >= qr * s) and torch.all(v <= qr * s + s - 1)
    assert torch.allclose(v, qr.float() * s + (s - 1) / 2)


@given(codes8, bits, modes)
def test_slices_are_monotonic_in_the_code(q, r, mode):
    qs, _ = torch.sort(q.int())
    v = slice_master(qs, 8, r, mode)
    assert torch.all(v[1:] >= v[:-1])


@given(codes8, bits, modes)
def test_slice_error_bound(q, r, mode):
    """|S(q) - q| <= half a step (paper/extra), < a step for nested; paper's clamp adds at most another half step."""
    s = 2 ** (8 - r)
    err = (slice_master(q, 8, r, mode) - q.float()).abs()
    bound = {"paper": s, "extra": s / 2, "nested": s / 2}[mode]
    assert torch.all(err <= bound + 1e-6)


@given(codes8, bits)
def test_paper_clamp_range_and_extra_overflow(q, r):
    assert int(slice_codes(q, 8, r, "paper").max()) <= 2**r - 1
    e = slice_codes(q, 8, r, "extra")
    assert int(e.max()) <= 2**r
    frac = overflow_fraction(q, 8, r, "extra")
    assert abs(frac - (e == 2**r).float().mean().item()) < 1e-9
    assert effective_code_bits(q, 8, r, "extra") >= r


@given(codes8, st.integers(2, 8), st.data())
def test_slice_of_a_slice(q, r1, data):
    """nested: slicing to r1 then to r2 equals slicing straight to r2 (exact nesting)."""
    r2 = data.draw(st.integers(1, r1))
    direct = slice_codes(q, 8, r2, "nested")
    via = slice_codes(slice_codes(q, 8, r1, "nested"), r1, r2, "nested")
    assert torch.equal(direct, via)


@given(codes8, bits, modes)
def test_codes_to_master_units_inverts_slice_codes(q, r, mode):
    assert torch.equal(codes_to_master_units(slice_codes(q, 8, r, mode), 8, r, mode), slice_master(q, 8, r, mode))


@settings(deadline=None, max_examples=30)
@given(st.integers(1, 8), st.sampled_from([8, 16, -1]), st.booleans(), st.integers(0, 1000))
def test_quantizer_error_bound_and_range(b, gs, sym, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(6, 32, generator=g)
    qw = quantize_minmax(w, b, gs, sym, torch.float32)
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= 2**b - 1
    err = (dequantize(qw) - w).abs().reshape(6, -1, qw.group_size)
    step = qw.scales.unsqueeze(-1)
    # asymmetric MinMax: every weight within half a step; symmetric: the clamped negative end may lose one step
    assert torch.all(err <= step * (0.5 if not sym else 1.0) + 1e-5)


@given(codes8, bits, modes)
def test_ste_forward_equals_hard_slice(q, r, mode):
    qf = q.float().requires_grad_()
    y = slice_master_ste(qf, 8, r, mode)
    assert torch.equal(y.detach(), slice_master(q, 8, r, mode))
    y.sum().backward()
    # straight-through: gradient 1 everywhere, except 0 exactly where paper's clamp cuts the top level 2^r off
    clamped = slice_codes(q, 8, r, "extra") > 2**r - 1
    expected = (~clamped).float() if mode == "paper" else torch.ones_like(qf)
    assert torch.equal(qf.grad, expected)


def test_fake_quant_ste_matches_dequantize_and_passes_gradient():
    from matquant.quant.ste import fake_quant_ste

    w = torch.randn(4, 64)
    qw = quantize_minmax(w, 8, 32, param_dtype=torch.float32)
    for r in (8, 4, 2):
        for mode in ("paper", "nested"):
            wp = w.clone().requires_grad_()
            y = fake_quant_ste(wp, qw.scales, qw.zeros, 8, r, mode)
            assert torch.allclose(y.detach(), dequantize(qw, r, mode), atol=1e-5)
            y.square().sum().backward()
            assert wp.grad.abs().sum() > 0


def test_quantizer_rejects_bad_input():
    import pytest

    with pytest.raises(ValueError, match="1..8"):
        quantize_minmax(torch.randn(4, 64), 9, 64)
    with pytest.raises(ValueError, match="does not divide"):
        quantize_minmax(torch.randn(4, 60), 4, 64)
    with pytest.raises(ValueError, match="NaN"):
        quantize_minmax(torch.tensor([[float("nan")] * 4]), 4, -1)
    with pytest.raises(ValueError, match="cannot slice"):
        slice_codes(torch.tensor([3], dtype=torch.uint8), 4, 6, "paper")
    with pytest.raises(ValueError, match="unknown slicing"):
        slice_codes(torch.tensor([3], dtype=torch.uint8), 8, 4, "truncate")
