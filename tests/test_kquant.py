"""K-quant parameters for fixed codes (quant/kquant.py): the block bytes read back through gguf-py's dequantizers
(a reader we did not write) give exactly `dequantize_kquant`; the fit is never worse than its naive start, recovers
exactly representable weights, follows the importance weights and the sign of the offsets; bad shapes are refused."""
from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import pytest

from matquant.quant.kquant import (FORMAT_FOR_BITS, FORMATS, KQuantParams, dequantize_kquant, encode_kquant,
                                   fit_kquant, initial_kquant, kquant_error)

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType  # noqa: E402
from gguf.quants import dequantize  # noqa: E402

NAMES = sorted(FORMATS)


def _minmax_codes(w: np.ndarray, r: int, group: int = 64) -> np.ndarray:
    """Asymmetric min-max codes per `group` (the shape of matquant's slices)."""
    rows, cols = w.shape
    g = w.reshape(rows, -1, group)
    lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
    q = np.round((g - lo) / np.maximum(hi - lo, 1e-12) * (2**r - 1))
    return np.clip(q, 0, 2**r - 1).reshape(rows, cols).astype(np.uint8)


def _weights(rows: int, cols: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((rows, cols)) * 0.02 * (0.5 + rng.random((rows, 1)))).astype(np.float32)


def _random_params(name: str, rows: int, cols: int, seed: int) -> KQuantParams:
    """Arbitrary parameters over each format's whole integer ranges, d and dmin of both signs."""
    f = FORMATS[name]
    rng = np.random.default_rng(seed)
    nb = cols // f.block
    codes = rng.integers(0, 2**f.code_bits, (rows, cols)).astype(np.uint8)
    d = (rng.standard_normal((rows, nb)) * 1e-3).astype(np.float16)
    if f.name == "Q8_0":
        return KQuantParams(f, codes, d, np.ones((rows, nb, 1), np.int16))
    sc = rng.integers(f.sc_lo, f.sc_hi + 1, (rows, nb, f.n_sub)).astype(np.int16)
    if not f.affine:
        return KQuantParams(f, codes, d, sc)
    dmin = (rng.standard_normal((rows, nb)) * 1e-3).astype(np.float16)
    m = rng.integers(0, f.m_hi + 1, (rows, nb, f.n_sub)).astype(np.int16)
    return KQuantParams(f, codes, d, sc, dmin, m)


def _gguf_values(p: KQuantParams) -> np.ndarray:
    return dequantize(encode_kquant(p), GGMLQuantizationType[p.fmt.name]).reshape(p.codes.shape)


@pytest.mark.parametrize("name", NAMES)
def test_encoded_bytes_read_back_by_gguf_py_are_dequantize_kquant(name):
    f = FORMATS[name]
    p = _random_params(name, 3, 512, seed=len(name) + f.code_bits)
    data = encode_kquant(p)
    assert data.dtype == np.uint8 and data.shape == (3, 512 // f.block * f.block_bytes)
    np.testing.assert_array_equal(_gguf_values(p), dequantize_kquant(p))
    # and the fitted parameters of real-looking codes (the path the exporter takes)
    w = _weights(4, 512, seed=1)
    fit = fit_kquant(name, _minmax_codes(w, f.code_bits), w, np.random.default_rng(2).random(512))
    np.testing.assert_array_equal(_gguf_values(fit), dequantize_kquant(fit))


def _ggml_to_float(name: str):
    """ggml's own C dequantizer of `name` from libggml-base.so in $MATQUANT_LLAMA_CPP, or None."""
    lib = Path(os.environ.get("MATQUANT_LLAMA_CPP", "/nonexistent")) / "libggml-base.so"
    if not lib.exists():
        return None

    class Traits(ctypes.Structure):  # struct ggml_type_traits (ggml.h)
        _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                    ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                    ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p), ("from_float_ref", ctypes.c_void_p)]
    ggml = ctypes.CDLL(str(lib))
    ggml.ggml_get_type_traits.restype = ctypes.POINTER(Traits)
    fn = ggml.ggml_get_type_traits(int(GGMLQuantizationType[name])).contents.to_float
    return ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(fn)


@pytest.mark.parametrize("name", NAMES)
def test_llama_cpp_own_dequantizer_agrees_negative_scales_included(name):
    """The same bytes through ggml's C dequantizer (what llama.cpp runs), with d and dmin of both signs."""
    to_float = _ggml_to_float(name)
    if to_float is None:
        pytest.skip("set MATQUANT_LLAMA_CPP to llama.cpp's build/bin (libggml-base.so) for this check")
    p = _random_params(name, 3, 512, seed=11)
    assert (p.d.astype(np.float32) < 0).any()
    data = np.ascontiguousarray(encode_kquant(p))
    out = np.zeros(p.codes.size, np.float32)
    to_float(data.ctypes.data, out.ctypes.data, out.size)
    np.testing.assert_array_equal(out.reshape(p.codes.shape), dequantize_kquant(p))


@pytest.mark.parametrize("name", NAMES)
def test_fit_is_never_worse_than_the_naive_start(name):
    f = FORMATS[name]
    w = _weights(16, 1024, seed=3)
    imp = np.random.default_rng(4).gamma(0.5, size=1024)
    q = _minmax_codes(w, f.code_bits)
    naive = kquant_error(initial_kquant(name, q, w, imp), w, imp)
    fitted = kquant_error(fit_kquant(name, q, w, imp), w, imp)
    assert (fitted <= naive * (1 + 1e-9)).all()
    if f.affine:  # the alternation has room here: scales and mins are coarse
        assert fitted.sum() < 0.99 * naive.sum()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", [7, 8])
def test_exactly_representable_weights_are_recovered(name, seed):
    """Weights made from stored parameters whose largest integer is in the upper half of its range (the fit scans
    that half; a quantizer that sets d from the largest value puts it at the top)."""
    f = FORMATS[name]
    p = _random_params(name, 4, 512, seed=seed)
    rng = np.random.default_rng(seed)
    top = max(f.sc_hi, -f.sc_lo)
    if f.name != "Q8_0":  # one sub-block per super-block at a large integer (of either sign where sc is signed)
        big = rng.integers((top + 1) // 2, f.sc_hi + 1, p.sc.shape[:2])
        p.sc[..., 0] = big if f.affine else big * rng.choice([-1, 1], big.shape)
    if f.affine:  # d and dmin of either sign (an offset sign per super-block, as the format stores it)
        p.m[..., 1] = rng.integers((f.m_hi + 1) // 2, f.m_hi + 1, p.m.shape[:2])
    w = dequantize_kquant(p)
    fit = fit_kquant(name, p.codes, w)
    err = kquant_error(fit, w)
    assert (err <= 1e-12 * (w.astype(np.float64) ** 2).sum(1)).all()
    np.testing.assert_allclose(dequantize_kquant(fit), w, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("name", ["Q2_K", "Q4_K", "Q6_K", "Q8_0"])
def test_a_heavily_weighted_column_gets_a_lower_error(name):
    f = FORMATS[name]
    w = _weights(64, 256, seed=5)
    q = _minmax_codes(w, f.code_bits)
    j = 37
    imp = np.ones(256)
    imp[j] = 1000.0
    plain = dequantize_kquant(fit_kquant(name, q, w)).astype(np.float64)
    weighted = dequantize_kquant(fit_kquant(name, q, w, imp)).astype(np.float64)
    assert ((w[:, j] - weighted[:, j]) ** 2).sum() < ((w[:, j] - plain[:, j]) ** 2).sum()
    # and the weighted objective is what improved
    assert kquant_error(fit_kquant(name, q, w, imp), w, imp).sum() <= kquant_error(fit_kquant(name, q, w), w, imp).sum()


@pytest.mark.parametrize("name", ["Q2_K", "Q4_K", "Q5_K"])
def test_offsets_of_the_other_sign_take_a_negative_dmin(name):
    """All-positive weights: every sub-block's best value at code 0 is positive, i.e. −dmin·m > 0 with m >= 0, which
    only a negative dmin stores (the dequantizers allow it: they only multiply)."""
    f = FORMATS[name]
    w = 1.0 + _weights(8, 256, seed=9)
    q = _minmax_codes(w, f.code_bits)
    fit = fit_kquant(name, q, w)
    assert (fit.dmin.astype(np.float32) < 0).all()
    a_free = 0.02 * 8 / (2**f.code_bits - 1)  # about the step of the codes: the error stays of the codes' order
    assert np.sqrt(kquant_error(fit, w).mean() / 256) < a_free


def test_bad_shapes_and_values_are_refused():
    w = _weights(2, 320, seed=0)
    q = _minmax_codes(w, 4)
    with pytest.raises(ValueError, match="whole blocks of 256"):
        fit_kquant("Q4_K", q, w)
    with pytest.raises(ValueError, match="whole blocks of 32"):
        fit_kquant("Q8_0", q[:, :48], w[:, :48])
    w = _weights(2, 256, seed=0)
    q = _minmax_codes(w, 4)
    with pytest.raises(ValueError, match="codes must be in 0..3"):
        fit_kquant("Q2_K", q, w)
    with pytest.raises(ValueError, match="one value per column"):
        fit_kquant("Q4_K", q, w, np.ones(255))
    with pytest.raises(ValueError, match=">= 0"):
        fit_kquant("Q4_K", q, w, -np.ones(256))
    with pytest.raises(ValueError, match="differ in shape"):
        fit_kquant("Q4_K", q, w[:1])
    with pytest.raises(ValueError, match=r"\[rows, cols\]"):
        fit_kquant("Q4_K", q[0], w[0])
    with pytest.raises(ValueError, match="unknown K-quant format"):
        fit_kquant("Q4_0", q, w)


def test_format_table():
    assert {FORMATS[FORMAT_FOR_BITS[r]].code_bits for r in FORMAT_FOR_BITS} == set(FORMAT_FOR_BITS)
    assert FORMATS["Q4_K"].bits_per_weight == 4.5 and FORMATS["Q2_K"].bits_per_weight == 2.625
    assert FORMATS["Q8_0"].bits_per_weight == 8.5 and FORMATS["Q6_K"].bits_per_weight == 6.5625
