"""Integer zero points (quant/integer_zero.py, `zero_points='master'|'integer'`): the int8 master's (and the int4
slice's) zero points on their own integer code grids, fitted for fixed codes, never worse than rounding the free
fit's zero."""
from __future__ import annotations

import pytest
import torch

from matquant.algorithms import quantize_model
from matquant.algorithms.slice_params import integer_zero_pairs, with_slice_params
from matquant.nn.bits import matquant_modules
from matquant.quant.integer_zero import grid_storable, integer_zero_params, on_grid, snap_to_grid, zero_grid
from matquant.quant.minmax import QuantizedWeight, dequantize, minmax_params, quantize_codes
from matquant.quant.refit import refit_params
from matquant.quant.slicing import slice_codes


def _problem(seed=0, out=24, inn=128, gs=32):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(out, inn, generator=g)
    X = torch.randn(500, inn, generator=g) @ (0.3 * torch.randn(inn, inn, generator=g) + torch.eye(inn))
    X += torch.randn(inn, generator=g)  # a mean component, as LLM activations have
    s, z = minmax_params(W, 8, gs, False, torch.float16)
    return W, X.T @ X, quantize_codes(W, s, z, 8), s.half(), z.half(), gs


def _err(W, H, codes, s, z, r, gs, mode="nested"):
    E = (W - dequantize(QuantizedWeight(codes, s, z, 8, gs), r, mode)).double()
    return ((E @ H.double()) * E).sum(1) if H is not None else (E * E).sum(1)


def test_grid():
    assert zero_grid(8, 8, "nested") == (0.0, 1, 255)
    assert zero_grid(8, 4, "nested") == (7.5, 16, 15) and zero_grid(8, 4, "paper") == (0.0, 16, 15)
    z = torch.tensor([[7.5, 23.5, 8.0, -1.0, 247.5, 263.5]])
    assert on_grid(z, 8, 4, "nested").tolist() == [[True, True, False, False, True, False]]
    assert snap_to_grid(z, 8, 4, "nested").tolist() == [[7.5, 23.5, 7.5, 7.5, 247.5, 247.5]]
    assert grid_storable(8, 4, "nested", torch.float16) and grid_storable(8, 8, "nested", torch.bfloat16)
    assert not grid_storable(8, 4, "nested", torch.bfloat16)  # 7.5 + 16k needs 9 significant bits
    with pytest.raises(ValueError, match="not storable in bfloat16"):
        W, H, q, s, z, gs = _problem()
        integer_zero_params(W, H, q, s, z, master_bits=8, bits=4, group_size=gs, slicing="nested",
                            param_dtype=torch.bfloat16)


@pytest.mark.parametrize("mode", ["nested", "paper"])
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("weighted", [True, False])
def test_integral_in_range_and_never_worse_than_rounding(mode, bits, weighted):
    W, H, q, s, z, gs = _problem()
    if bits < 8:  # start from the slice's own free least-squares pair, as with_slice_params does
        (fs, fz, _), = refit_params(W, H, q, s.float(), z.float(), master_bits=8, group_size=gs, slicing=mode,
                                    slices=[bits], separate=True).values()
        s, z = fs.half(), fz.half()
    Hw = H if weighted else None
    q0 = q.clone()
    si, zi = integer_zero_params(W, Hw, q, s, z, master_bits=8, bits=bits, group_size=gs, slicing=mode)
    assert torch.equal(q, q0)  # the codes are not touched
    assert si.dtype == s.dtype == zi.dtype and si.shape == s.shape and (si > 0).all()
    assert on_grid(zi, 8, bits, mode).all()  # integral and in range
    k = (zi.double() - zero_grid(8, bits, mode)[0]) / 2 ** (8 - bits)
    assert k.min() >= 0 and k.max() <= 2**bits - 1
    e_free = _err(W, Hw, q, s, z, bits, gs, mode)
    e_round = _err(W, Hw, q, s, snap_to_grid(z, 8, bits, mode).half(), bits, gs, mode)
    e_int = _err(W, Hw, q, si, zi, bits, gs, mode)
    assert (e_int <= e_round * (1 + 1e-6)).all()  # per row, with the stored values
    assert e_int.sum() < e_round.sum() and e_int.sum() >= e_free.sum() * (1 - 1e-6)


def test_slice_is_an_integer_zero_point_tensor():
    """On the grid, the nested int4 slice is scale·(q_signed − zp) with an integer zp: bit for bit in float64."""
    W, H, q, s, z, gs = _problem()
    si, zi = integer_zero_params(W, H, q, s, z, master_bits=8, bits=4, group_size=gs, slicing="nested")
    scale = si.double() * 16
    zp = (zi.double() - 7.5) / 16 - 8
    assert torch.equal(zp, zp.round()) and zp.min() >= -8 and zp.max() <= 7
    q4 = slice_codes(q, 8, 4, "nested").double() - 8
    ct = scale.repeat_interleave(gs, 1) * (q4 - zp.repeat_interleave(gs, 1))
    ours = si.double().repeat_interleave(gs, 1) * (slice_codes(q, 8, 4, "nested").double() * 16 + 7.5
                                                   - zi.double().repeat_interleave(gs, 1))
    assert torch.equal(ct, ours)
    assert torch.equal(si.float() * 16, (si.float() * 16).half().float())  # the fp16 scale is exact


def test_with_slice_params_integer_moves_only_the_master_and_int4():
    W, H, q, s, z, gs = _problem()
    free = with_slice_params(QuantizedWeight(q, s.clone(), z.clone(), 8, gs), W, H, "own", "nested", False,
                             torch.float16, zero_points="free")
    ints = with_slice_params(QuantizedWeight(q, s.clone(), z.clone(), 8, gs), W, H, "own", "nested", False,
                             torch.float16, zero_points="integer")
    assert torch.equal(ints.codes, free.codes)
    assert on_grid(ints.zeros, 8, 8, "nested").all() and on_grid(ints.slice_params[4][1], 8, 4, "nested").all()
    assert not on_grid(free.slice_params[4][1], 8, 4, "nested").all()
    for r in (6, 3, 2):  # the other slices keep their free pairs
        assert all(torch.equal(a, b) for a, b in zip(ints.slice_params[r], free.slice_params[r]))
    master = with_slice_params(QuantizedWeight(q, s.clone(), z.clone(), 8, gs), W, H, "own", "nested", False,
                               torch.float16, zero_points="master")  # the default: the master's own pair only
    assert torch.equal(master.zeros, ints.zeros) and torch.equal(master.scales, ints.scales)
    assert all(torch.equal(a, b) for r in (6, 4, 3, 2) for a, b in zip(master.slice_params[r], free.slice_params[r]))
    shared = with_slice_params(QuantizedWeight(q, s.clone(), z.clone(), 8, gs), W, H, "shared", "nested", False,
                               torch.float16, zero_points="integer")
    assert on_grid(shared.zeros, 8, 8, "nested").all() and shared.slice_params is None
    bf = integer_zero_pairs(QuantizedWeight(q, s.bfloat16(), z.bfloat16(), 8, gs,
                                            {4: (s.bfloat16(), z.bfloat16())}), W, H, "nested", torch.bfloat16)
    assert on_grid(bf.zeros, 8, 8, "nested").all() and torch.equal(bf.slice_params[4][1], z.bfloat16())
    with pytest.raises(ValueError, match="unknown zero_points"):
        with_slice_params(QuantizedWeight(q, s, z, 8, gs), W, H, "own", "nested", False, torch.float16,
                          zero_points="round")


def test_methods_default_to_integer_master_zero_points_where_the_master_reads_them_alone():
    from conftest import tiny_model

    calib = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(2))
    m = tiny_model("llama")  # default 'master' with shared parameters: every slice reads the pair, left as it is
    qcfg = quantize_model(m, "rtn", group_size=32, scope="ffn", progress=False)
    assert qcfg.method_args == {}
    assert not all(on_grid(mod.zeros, 8, 8, "nested").all() for mod in matquant_modules(m).values())
    m = tiny_model("llama")  # default with own parameters (the quality recipe): the master's pair on its grid
    quantize_model(m, "matgptq", group_size=32, scope="ffn", progress=False, calib=calib, slice_params="own")
    assert all(on_grid(mod.zeros, 8, 8, "nested").all() for mod in matquant_modules(m).values())
    m = tiny_model("llama")
    qcfg = quantize_model(m, "matgptq", group_size=32, scope="ffn", progress=False, calib=calib, slice_params="own",
                          zero_points="integer")
    assert qcfg.method_args == {"slice_params": "own", "zero_points": "integer"}
    for mod in matquant_modules(m).values():
        assert on_grid(mod.zeros, 8, 8, "nested").all() and on_grid(mod.group_params(4)[1], 8, 4, "nested").all()
        assert not on_grid(mod.group_params(2)[1], 8, 2, "nested").all()  # int2 keeps its free pair
    m = tiny_model("llama")  # 'integer' with shared parameters: the master's pair moved, weight-error fit
    qcfg = quantize_model(m, "rtn", group_size=32, scope="ffn", progress=False, zero_points="integer")
    assert qcfg.method_args == {"zero_points": "integer"}
    assert all(on_grid(mod.zeros, 8, 8, "nested").all() for mod in matquant_modules(m).values())
