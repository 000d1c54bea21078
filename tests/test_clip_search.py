"""Clipping search of the master's (α, z) (quant/clip_search.py) and the `clip` option of every method."""
import pytest
import torch

from matquant.quant.clip_search import MIDPOINT_GRID, clip_search, multislice_error, served_slices, _tables
from matquant.quant.minmax import affine_params, grouped, minmax_params, param_limits, symmetric_scale
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


@pytest.mark.parametrize("mode", ["nested", "paper"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_midpoint_grid_is_the_argmin_over_its_candidates(mode, symmetric):
    """strategy='midpoint_grid' (MatGPTQ's group_params='search'): ranges [m − a·ρ, m + b·ρ] about the MinMax
    range's mid-point (symmetric: b·absmax) for every (a, b) of MIDPOINT_GRID; the chosen one has the smallest error."""
    w = _weights("outliers")
    R, lam = served_slices(8)
    res = clip_search(w, None, bits=8, group_size=64, symmetric=symmetric, slicing=mode, strategy="midpoint_grid")
    assert res.minmax_error is None
    g = grouped(w, 64)
    errors = []
    for a in ((1.0,) if symmetric else MIDPOINT_GRID):
        for b in MIDPOINT_GRID:
            if symmetric:
                sc = symmetric_scale(g.abs().amax(-1) * b, 8)
                ze = torch.full_like(sc, 128.0)
            else:
                lo, hi = g.amin(-1), g.amax(-1)
                mid, rad = (lo + hi) / 2, (hi - lo) / 2
                sc, ze = affine_params(mid - rad * a, mid + rad * b, 8)
            errors.append(_reference_error(w, None, sc.half().float(), ze.half().float(), 8, R, lam, mode, 64))
    best = torch.stack(errors).min(0).values
    got = _reference_error(w, None, res.scale, res.zero, 8, R, lam, mode, 64)
    torch.testing.assert_close(got, best, rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="unknown range search strategy 'best'"):
        clip_search(w, None, bits=8, group_size=64, strategy="best")


def test_bad_inputs_are_clear_errors():
    w = _weights("random")
    with pytest.raises(ValueError, match="importance h must be 128"):
        clip_search(w, torch.ones(5), bits=8, group_size=64)
    with pytest.raises(ValueError, match="exceeds the int4 master"):
        clip_search(w, None, bits=4, group_size=64, slices=(8, 2))
    with pytest.raises(ValueError, match="NaN or Inf"):
        clip_search(w * float("nan"), None, bits=8, group_size=64)
    assert served_slices(4) == ((4, 3, 2), (1.0, 1.0, 1.0))
    assert served_slices(8) == ((8, 6, 4, 3, 2), (64.0, 16.0, 4.0, 2.0, 1.0))


# ---- the `clip` option of every method ------------------------------------------------------------------------

def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64)).eval()


_CALIB = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
_FAST = {"rtn": {}, "gptq": {}, "matgptq": {}, "omniquant": {"epochs": 1},
         "qat": {"steps": 1, "qparams": "learnable", "save_every": 0}}


def _codes(qcfg, model):
    mods = dict(model.named_modules())
    return {n: (mods[n].qweight.clone() if hasattr(mods[n], "qweight") else None, mods[n].scales.clone(),
                mods[n].zeros.clone()) for n in qcfg.modules}


@pytest.mark.parametrize("method", sorted(_FAST))
def test_every_method_takes_clip_and_the_result_loads_and_evaluates(method, tmp_path):
    from matquant.algorithms import method_options, quantize_model
    from matquant.format.checkpoint import load_checkpoint, save_checkpoint
    from matquant.nn.bits import set_bits

    assert "clip" in method_options(method)
    clip = "weighted" if method != "qat" else "mse"
    m_mm, m_cl = _tiny_llama(), _tiny_llama()
    base = dict(group_size=32, calib=_CALIB, progress=False, **_FAST[method])
    quantize_model(m_mm, method, **base)
    qcfg = quantize_model(m_cl, method, clip=clip, **base)
    assert qcfg.method_args["clip"] == clip  # recorded like every option
    save_checkpoint(m_cl, None, tmp_path / "ckpt", qcfg)
    loaded, _, lcfg = load_checkpoint(tmp_path / "ckpt")
    assert lcfg.method_args["clip"] == clip
    ids = _CALIB[:1]
    changed = False
    for r in (8, 4, 2):
        set_bits(m_cl, r)
        set_bits(loaded, r)
        set_bits(m_mm, r)
        with torch.no_grad():
            a, b = m_cl(ids).logits, loaded(ids).logits
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
        with torch.no_grad():
            changed |= not torch.equal(a, m_mm(ids).logits)
    assert changed  # the search moved some group parameters


@pytest.mark.parametrize("method", sorted(_FAST))
def test_clip_minmax_is_the_default_bit_for_bit(method):
    from matquant.algorithms import quantize_model

    m0, m1 = _tiny_llama(), _tiny_llama()
    base = dict(group_size=32, calib=_CALIB, progress=False, **_FAST[method])
    c0 = _codes(quantize_model(m0, method, **base), m0)
    c1 = _codes(quantize_model(m1, method, clip="minmax", **base), m1)
    for n in c0:
        for x, y in zip(c0[n], c1[n]):
            assert (x is None and y is None) or torch.equal(x, y)


def test_rtn_minmax_is_quantize_minmax():
    from matquant.algorithms import RTNConfig
    from matquant.algorithms.rtn import rtn
    from matquant.quant.minmax import quantize_minmax

    m = _tiny_llama()
    name = "model.layers.0.mlp.down_proj"
    qw = rtn(m, [name], RTNConfig(group_size=32), progress=False)
    ref = quantize_minmax(m.get_submodule(name).weight.detach(), 8, 32)
    assert torch.equal(qw[name].codes, ref.codes) and torch.equal(qw[name].scales, ref.scales)


def test_weighted_without_calibration_is_a_clear_error():
    from matquant.algorithms import quantize_model

    with pytest.raises(ValueError, match="clip='weighted' needs calibration"):
        quantize_model(_tiny_llama(), "rtn", group_size=32, clip="weighted", progress=False)
    with pytest.raises(ValueError, match="unknown clip 'best'"):
        quantize_model(_tiny_llama(), "rtn", group_size=32, clip="best", progress=False)
    with pytest.raises(ValueError, match="qparams='learnable'"):
        quantize_model(_tiny_llama(), "qat", group_size=32, calib=_CALIB, clip="mse", steps=1, progress=False)
    with pytest.raises(ValueError, match="give one of them"):
        quantize_model(_tiny_llama(), "matgptq", group_size=32, calib=_CALIB, clip="mse", group_params="search",
                       progress=False)


def test_cli_clip_flag_reaches_the_method():
    from matquant.cli import build_parser
    from matquant.commands.quantize import config_from_args

    def config(*argv):
        return config_from_args(build_parser().parse_args(["quantize", "--out", "x", *argv]))[0]

    with pytest.raises(SystemExit):
        config("--clip", "nope")
    for method in ("rtn", "gptq", "matgptq", "omniquant", "qat"):
        c = config("--method", method, "--clip", "mse", *(["--qparams", "learnable"] if method == "qat" else []))
        assert c.clip == "mse" and c.method_args()["clip"] == "mse"
    assert "clip" not in config("--method", "rtn").method_args()  # the default: not recorded
