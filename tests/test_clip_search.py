"""Clipping search of the master's (α, z) (quant/clip_search.py) and the `clip` option of every method."""
import pytest
import torch

from matquant.quant.clip_search import clip_search, multislice_error, served_slices, _tables
from matquant.quant.minmax import grouped, minmax_params, param_limits
from matquant.quant.slicing import slice_master


def _weights(kind, seed=0, shape=(16, 128)):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=g) * 0.05
    if kind == "outliers":
        mask = torch.rand(*shape, generator=g) < 0.02
        w = torch.where(mask, w * 20, w)
    elif kind == "special":  # constant, all-zero, one-sided and single-outlier groups
        w[0, :64] = 0.0
        w[1, :64] = 0.3
        w[2, :64] = -1e-3
        w[3, 64:] = w[3, 64:].abs() + 0.1
        w[4, 64:] = 0.0
        w[4, 70] = 2.0
    return w


def _reference_error(w, h, scale, zero, c, R, lam, mode, gs):
    """Σ_r λ_r Σ_i h_i (w − α(S_r(q) − z))², computed the plain way (explicit slicing) per group."""
    g = grouped(w.double(), gs)
    s, z = scale.double().unsqueeze(-1), zero.double().unsqueeze(-1)
    q = torch.floor(g / s + z + 0.5).clamp(0, 2**c - 1)
    hg = torch.ones_like(g[0]) if h is None else h.double().reshape(g.shape[1], gs)
    tot = torch.zeros(g.shape[:2], dtype=torch.float64)
    for r, lr in zip(R, lam):
        v = s * (slice_master(q.long(), c, r, mode).double() - z)
        tot += lr * ((g - v) ** 2 * hg).sum(-1)
    return tot


@pytest.mark.parametrize("kind", ["random", "outliers", "special"])
@pytest.mark.parametrize("mode", ["nested", "paper"])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("pdtype", [torch.float16, torch.bfloat16])
def test_search_is_never_worse_than_minmax_and_params_are_storable(kind, mode, symmetric, pdtype):
    w = _weights(kind)
    h = torch.rand(w.shape[1], generator=torch.Generator().manual_seed(1)) * 3
    R, lam = served_slices(8)
    res = clip_search(w, h, bits=8, group_size=64, symmetric=symmetric, slicing=mode, param_dtype=pdtype)
    s_mm, z_mm = minmax_params(w, 8, 64, symmetric, pdtype)
    s_mm, z_mm = s_mm.to(pdtype).float(), z_mm.to(pdtype).float()
    ref_search = _reference_error(w, h, res.scale, res.zero, 8, R, lam, mode, 64)
    ref_minmax = _reference_error(w, h, s_mm, z_mm, 8, R, lam, mode, 64)
    assert (ref_search <= ref_minmax * (1 + 1e-5) + 1e-12).all()  # per group, on the plain objective
    atol = 1e-6 * float(ref_minmax.max())  # float32 tables vs float64 reference
    torch.testing.assert_close(res.minmax_error.double(), ref_minmax, rtol=1e-4, atol=atol)
    torch.testing.assert_close(res.error.double(), ref_search, rtol=1e-4, atol=atol)
    # the stored-dtype floors hold and the parameters survive the storage dtype exactly
    tiny, zmax = param_limits(pdtype)
    assert (res.scale >= tiny).all() and (res.zero.abs() <= zmax).all()
    assert torch.equal(res.scale.to(pdtype).float(), res.scale) and torch.equal(res.zero.to(pdtype).float(), res.zero)
    if kind != "special":  # real improvement on random and outlier-heavy groups
        assert ref_search.sum() < 0.99 * ref_minmax.sum()


def test_degenerate_groups_keep_minmax_exactly():
    w = _weights("special")
    res = clip_search(w, None, bits=8, group_size=64)
    s_mm, z_mm = minmax_params(w, 8, 64)
    # the all-zero group: every candidate range is the same (scale floor), so MinMax is kept bit for bit
    assert res.scale[0, 0] == s_mm[0, 0].half().float() and res.zero[0, 0] == z_mm[0, 0].half().float()
    assert res.error[0, 0] == res.minmax_error[0, 0]
    assert (res.error <= res.minmax_error).all()


def test_zero_importance_group_keeps_minmax():
    w = _weights("outliers")
    h = torch.ones(w.shape[1])
    h[:64] = 0
    res = clip_search(w, h, bits=8, group_size=64)
    s_mm, z_mm = minmax_params(w, 8, 64)
    assert torch.equal(res.scale[:, 0], s_mm[:, 0].half().float())
    assert (res.error[:, 1] <= res.minmax_error[:, 1]).all()


def test_importance_changes_the_choice():
    w = _weights("outliers", shape=(32, 64))
    h = torch.ones(64)
    big = w.abs().argmax(1)  # make the outlier columns dominate the objective
    h[big] = 1000.0
    a = clip_search(w, None, bits=8, group_size=64)
    b = clip_search(w, h, bits=8, group_size=64)
    assert not torch.equal(a.scale, b.scale)


def test_table_form_matches_explicit_slices_for_every_code():
    for mode in ("nested", "paper", "extra"):
        R, lam = (8, 4, 2), (1.0, 2.0, 3.0)
        tables = _tables(8, R, lam, mode)
        u = torch.linspace(-3, 260, 5000).reshape(1, 1, -1)
        err = multislice_error(u, torch.ones(1, u.shape[-1]), torch.ones(1, 1), torch.zeros(1, 1), 8, tables)
        q = torch.floor(u + 0.5).clamp(0, 255).long()
        ref = sum(lr * (u - slice_master(q, 8, r, mode)) ** 2 for r, lr in zip(R, lam)).sum(-1)
        torch.testing.assert_close(err, ref, rtol=1e-5, atol=1e-3)


def test_bad_inputs_are_clear_errors():
    w = _weights("random")
    with pytest.raises(ValueError, match="importance h must be 128"):
        clip_search(w, torch.ones(5), bits=8, group_size=64)
    with pytest.raises(ValueError, match="exceeds the int4 master"):
        clip_search(w, None, bits=4, group_size=64, slices=(8, 2))
    with pytest.raises(ValueError, match="NaN or Inf"):
        clip_search(w * float("nan"), None, bits=8, group_size=64)
    assert served_slices(4) == ((4, 3, 2), (1.0, 1.0, 1.0))
