"""MinMax parameters that survive their storage dtype (fp16 / bf16 / fp32): constant groups, all-zero groups, huge and
tiny magnitudes give finite scales and zero-points, codes in range and a bounded dequantization error."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matquant.quant.minmax import dequantize, quantize_minmax

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# decimal exponents of the weight magnitudes each storage dtype can hold scales for
EXPONENTS = {"float16": (-12, 3), "bfloat16": (-30, 30), "float32": (-30, 30)}
KINDS = ("random", "constant", "zero", "offset", "mixed")


def _weight(kind, exp, seed, gs):
    g = torch.Generator().manual_seed(seed)
    mag = 10.0 ** exp
    shape = (4, 2 * gs)
    if kind == "random":
        return torch.randn(shape, generator=g) * mag
    if kind == "constant":
        return torch.full(shape, mag * (1 if seed % 2 else -1))
    if kind == "zero":
        return torch.zeros(shape)
    if kind == "offset":  # far from zero, tiny spread: the paper's z would be huge
        return mag * (1 + 1e-4 * torch.rand(shape, generator=g))
    w = torch.randn(shape, generator=g) * mag  # "mixed": a constant row, a zero row, a constant group
    w[0] = mag
    w[1] = 0
    w[2, :gs] = -mag
    return w


@settings(deadline=None, max_examples=250)
@given(st.sampled_from(sorted(DTYPES)), st.sampled_from(KINDS), st.integers(1, 8), st.sampled_from([8, 32]),
       st.booleans(), st.integers(0, 10**6), st.data())
def test_params_survive_storage_dtype(dname, kind, bits, gs, sym, seed, data):
    dtype = DTYPES[dname]
    exp = data.draw(st.integers(*EXPONENTS[dname]))
    w = _weight(kind, exp, seed, gs)
    qw = quantize_minmax(w, bits, gs, sym, dtype)
    assert qw.scales.dtype == dtype and qw.zeros.dtype == dtype
    assert torch.isfinite(qw.scales).all() and torch.isfinite(qw.zeros).all()
    assert (qw.scales > 0).all()
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= 2**bits - 1
    for r in range(1, bits + 1):
        for mode in ("paper", "nested", "extra"):
            assert torch.isfinite(dequantize(qw, r, mode)).all()
    # at the master precision every weight is within a step or two of its value; the slack is the stored dtype's
    # rounding of α and z (|z| is at most 2/eps, see minmax.param_limits), plus the symmetric quantizer's clamped end
    eps = torch.finfo(dtype).eps
    a = qw.scales.float().unsqueeze(-1)
    z = qw.zeros.float().abs().unsqueeze(-1)
    err = (dequantize(qw) - w).abs().reshape(4, -1, gs)
    wmax = w.abs().reshape(4, -1, gs).amax(-1, keepdim=True)
    bound = a * ((1.0 if sym else 0.5) + eps * (z + 2**bits)) * 1.01 + 1e-6 * wmax
    assert torch.all(err <= bound), float((err - bound).max())


@pytest.mark.parametrize("dname", sorted(DTYPES))
def test_constant_group_keeps_its_value(dname):
    """The case of the bug: 1e-8 underflowed to 0 in float16, z = inf, the group dequantized to NaN."""
    from matquant.quant.minmax import param_limits

    dtype = DTYPES[dname]
    w = torch.full((2, 64), 0.37)
    w[1] = 0.0
    qw = quantize_minmax(w, 8, 64, False, dtype)
    tiny, zmax = param_limits(dtype)
    assert float(qw.scales.float().min()) >= tiny and float(qw.zeros.float().abs().max()) <= zmax
    for r, mode in ((8, "paper"), (4, "paper"), (2, "nested")):
        back = dequantize(qw, r, mode)
        assert torch.isfinite(back).all()
        # nested reads a bucket centre: up to α·(2^(8−r) − 1)/2 off, i.e. that over zmax of the value (the zero row:
        # α is the dtype's smallest normal)
        centre = (2 ** (8 - r) - 1) / 2 if mode == "nested" else 0.0
        assert torch.allclose(back, w, rtol=centre / zmax + 0.01, atol=centre * tiny + 1e-30), (r, mode)


def test_groups_containing_zero_keep_the_paper_parameters():
    """The floors only bind for degenerate groups: a group that contains 0 gets α = (max − min)/(2^c − 1), z = −min/α."""
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    for dtype in DTYPES.values():
        qw = quantize_minmax(w, 8, 32, False, dtype)
        g = w.reshape(8, 2, 32)
        lo, hi = g.amin(-1), g.amax(-1)
        alpha = (hi - lo) / 255
        assert torch.equal(qw.scales, alpha.to(dtype))
        assert torch.equal(qw.zeros, (-lo / alpha).to(dtype))


def test_weights_too_large_for_float16_are_refused():
    with pytest.raises(ValueError, match="float32"):
        quantize_minmax(torch.randn(2, 64) * 1e9, 8, 64, False, torch.float16)


@pytest.mark.parametrize("dname", ["float16", "bfloat16"])
def test_checkpoint_with_constant_groups_round_trips(tmp_path, tiny_tokenizer, dname):
    from conftest import tiny_model

    from matquant.algorithms import quantize_model
    from matquant.format.checkpoint import load_checkpoint, save_checkpoint
    from matquant.nn import set_bits

    model = tiny_model("llama")
    with torch.no_grad():
        up = model.model.layers[0].mlp.up_proj.weight
        up[0] = 0.37  # a constant row: every group of it is constant
        up[1] = 0.0   # an all-zero row
        up[2, :32] = -1e-3
    qcfg = quantize_model(model, "rtn", group_size=32, scope="ffn", slicing="nested", param_dtype=dname)
    save_checkpoint(model, tiny_tokenizer, tmp_path / "ck", qcfg)
    loaded, _, _ = load_checkpoint(tmp_path / "ck")
    x = torch.randint(0, 320, (1, 8))
    for b in (8, 4, 2):
        set_bits(model, b)
        set_bits(loaded, b)
        with torch.no_grad():
            y = loaded(x).logits
        assert torch.isfinite(y).all()
        assert torch.equal(y, model(x).logits)


def test_training_routes_store_finite_params_for_degenerate_groups():
    """QAT's learnable scales and OmniQuant's LWC finalize floor α/z for the stored dtype (was clamp_min(1e-8): 0 in fp16)."""
    from matquant.algorithms.training.fake_quant import FakeQuantLinear

    w = torch.randn(4, 64) * 0.02
    w[0] = 0.3  # a constant non-zero row: one group with hi == lo
    lin = FakeQuantLinear(w, None, 64, 8, False, torch.float16, "learnable", "nested")
    with torch.no_grad():
        lin.log_scale[0] = math.log(1e-9)  # what optimizer steps can do to a learnable scale
    qw = lin.final()
    assert torch.isfinite(qw.scales).all() and (qw.scales > 0).all() and torch.isfinite(qw.zeros).all()
    s, z = lin.qparams()
    assert torch.isfinite(s).all() and (s > 0).all() and torch.isfinite(z).all()
