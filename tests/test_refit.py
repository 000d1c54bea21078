"""Least-squares refit of (α, z) for fixed codes (quant/refit.py) and its `refit` option of gptq / matgptq."""
from __future__ import annotations

import pytest
import torch

from matquant.algorithms import quantize_model
from matquant.algorithms.gptq import gptq_quantize_weight
from matquant.algorithms.matgptq import MultiSliceRounder, matgptq_quantize_weight
from matquant.quant.minmax import QuantizedWeight, dequantize, minmax_params, quantize_codes
from matquant.quant.refit import refit_params

BITS, LAM = (8, 4, 2), (4.0, 2.0, 1.0)


def _problem(seed=0, out=12, inn=64):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inn, generator=g)
    X = torch.randn(400, inn, generator=g) @ (torch.randn(inn, inn, generator=g) * torch.linspace(0.1, 2, inn))
    return W, X.T @ X


def _error(W, H, qw, bits=BITS, lam=LAM, mode="nested"):
    """Σ_r λ_r tr((W − Ŵ_r) H (W − Ŵ_r)ᵀ) per row, in float64."""
    tot = torch.zeros(W.shape[0], dtype=torch.float64)
    for r, lr in zip(bits, lam):
        E = (W - dequantize(qw, r, mode)).double()
        tot += lr * ((E @ H.double()) * E).sum(1)
    return tot


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float16])
def test_refit_never_worse_and_optimal(symmetric, param_dtype):
    W, H = _problem()
    s, z = minmax_params(W, 8, 16, symmetric, param_dtype)
    q = quantize_codes(W, s, z, 8)
    before = QuantizedWeight(q, s.to(param_dtype), z.to(param_dtype), 8, 16)
    s2, z2, frac = refit_params(W, H, q, before.scales.float(), before.zeros.float(), master_bits=8, group_size=16,
                                slicing="nested", slices=BITS, lambdas=LAM, symmetric=symmetric,
                                param_dtype=param_dtype)
    after = QuantizedWeight(q, s2.to(param_dtype), z2.to(param_dtype), 8, 16)
    e0, e1 = _error(W, H, before), _error(W, H, after)
    assert (e1 <= e0 * (1 + 1e-9)).all()  # per row, with the STORED values
    assert e1.sum() < 0.995 * e0.sum() and frac > 0.5  # MinMax is not the least-squares optimum for these codes
    if symmetric:
        assert torch.equal(z2.to(param_dtype), before.zeros)  # the mid-point stays
    if param_dtype == torch.float32:  # a stationary point: no small move of any (α, z) improves it
        g = torch.Generator().manual_seed(1)
        for _ in range(10):
            ds = 1 + 1e-3 * torch.randn(s2.shape, generator=g)
            dz = 0 if symmetric else 1e-2 * torch.randn(z2.shape, generator=g)
            moved = QuantizedWeight(q, s2 * ds, z2 + dz, 8, 16)
            assert _error(W, H, moved).sum() >= e1.sum() * (1 - 1e-9)


def test_refit_recovers_exact_parameters():
    """Weights that ARE α·(S_8(q) − z) for known (α, z): from wrong starting values the refit finds them again."""
    g = torch.Generator().manual_seed(3)
    q = torch.randint(0, 256, (6, 32), generator=g, dtype=torch.uint8)
    s_true = torch.rand(6, 2, generator=g) * 0.1 + 0.01
    z_true = torch.rand(6, 2, generator=g) * 200 + 20
    W = dequantize(QuantizedWeight(q, s_true, z_true, 8, 16), 8)
    H = torch.eye(32) + 0.1
    s2, z2, _ = refit_params(W, H, q, s_true * 1.3, z_true - 7, master_bits=8, group_size=16, slicing="nested",
                             param_dtype=torch.float32)
    assert torch.allclose(s2, s_true, rtol=1e-4) and torch.allclose(z2, z_true, rtol=1e-4)


def test_refit_degenerate_groups_and_dead_columns():
    W, H = _problem(out=4, inn=32)
    W[:, :16] = 0.25  # a constant group: every code equal, α and t collinear
    H[:, 20:24] = 0
    H[20:24, :] = 0  # columns never seen in calibration
    s, z = minmax_params(W, 8, 16, False, torch.float16)
    q = quantize_codes(W, s, z, 8)
    s2, z2, _ = refit_params(W, H, q, s, z, master_bits=8, group_size=16, slicing="nested", slices=BITS, lambdas=LAM,
                             param_dtype=torch.float16)
    assert torch.isfinite(s2).all() and torch.isfinite(z2).all() and (s2 > 0).all()
    assert torch.isfinite(dequantize(QuantizedWeight(q, s2.half(), z2.half(), 8, 16), 2)).all()


@pytest.mark.parametrize("method", ["gptq", "matgptq"])
def test_refit_option_lowers_the_layer_objective(method):
    W, H = _problem(seed=5, out=16, inn=64)
    if method == "gptq":
        runs = [gptq_quantize_weight(W, H, 4, 16, refit=r)[0] for r in (False, True)]
        e = [_error(W, H, qw, (4,), (1.0,)).sum() for qw in runs]
    else:
        rounder = MultiSliceRounder(8, BITS, LAM, "nested")
        runs = [matgptq_quantize_weight(W, H, rounder, 16, refit=r)[0] for r in (False, True)]
        e = [_error(W, H, qw).sum() for qw in runs]
    assert torch.equal(runs[0].codes, runs[1].codes)  # the refit changes (α, z) only
    assert e[1] < e[0]


def test_refit_recorded_in_method_args():
    from tests.test_gptq import calib_windows, tiny_llama

    model = tiny_llama(layers=1)
    qc = quantize_model(model, "matgptq", group_size=32, calib=calib_windows(2, 16), progress=False, refit=True)
    assert qc.method_args["refit"] is True


def test_cli_refit_flag_is_recorded_only_when_given():
    from matquant.cli import build_parser
    from matquant.commands.quantize import config_from_args

    def kw(*argv):
        return config_from_args(build_parser().parse_args(["quantize", "--out", "x", *argv]))[0].method_args()

    assert kw("--refit")["refit"] is True and kw("--method", "gptq", "--refit")["refit"] is True
    assert "refit" not in kw()  # the checkpoints made without it keep their method_args


def test_cli_refit_with_another_method_is_an_error():
    from matquant.cli import build_parser
    from matquant.commands.quantize import config_from_args

    args = build_parser().parse_args(["quantize", "--out", "x", "--method", "rtn", "--refit"])
    with pytest.raises(ValueError, match="--refit applies to --method gptq or matgptq, not rtn"):
        config_from_args(args)


def test_refit_wide_layer_after_set_num_threads():
    """More than 128 groups per row (2G > 256: Llama-2-7B's down_proj has G = 172) after torch.set_num_threads(2),
    as `--threads 2` does: torch 2.13's batched LU solve fails there on CPU ("Pivots given to lu_solve ..."), so the
    refit and the integer-zero fit must not use it; both still return finite, never-worse parameters."""
    from matquant.quant.integer_zero import integer_zero_params, on_grid
    g = torch.Generator().manual_seed(5)
    gs, G = 16, 136
    inn = gs * G
    W = torch.randn(3, inn, generator=g)
    X = torch.randn(3000, inn, generator=g)
    H = X.T @ X
    s, z = minmax_params(W, 8, gs, False, torch.float16)
    q = quantize_codes(W, s, z, 8)
    before = QuantizedWeight(q, s.half(), z.half(), 8, gs)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        s2, z2, frac = refit_params(W, H, q, s.float(), z.float(), master_bits=8, group_size=gs, slicing="nested",
                                    slices=BITS, lambdas=LAM, chunk=2)
        s4, z4 = integer_zero_params(W, H, q, s.float(), z.float(), master_bits=8, bits=4, group_size=gs,
                                     slicing="nested", chunk=2)
    finally:
        torch.set_num_threads(threads)
    after = QuantizedWeight(q, s2.half(), z2.half(), 8, gs)
    assert torch.isfinite(s2).all() and torch.isfinite(z2).all() and frac > 0
    assert (_error(W, H, after) <= _error(W, H, before) * (1 + 1e-9)).all()
    assert torch.isfinite(s4).all() and on_grid(z4, 8, 4, "nested").all()
