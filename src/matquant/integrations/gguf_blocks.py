"""GGML block encoders written from OUR slice parameters (pure numpy; layouts as in gguf-py's quants.py, whose
dequantizers the tests use to check every encoder).

Exact encoders (the slice W = q·A + B is stored as it is, up to the fp16 rounding of d and m):
  Q4_1  block 32: d, m (fp16), 16 bytes of nibbles (element j low nibble, j+16 high)    W = d·q + m, q in 0..15
  Q5_1  block 32: d, m (fp16), 4 bytes of 5th bits, 16 bytes of nibbles                  W = d·q + m, q in 0..31
Nearest encoders (scales fitted to the slice values, minimising the squared error against them):
  Q8_0  block 32: d (fp16), 32 int8                                                      W = d·q, q in -128..127
  Q6_K  block 256: 16 sub-blocks of 16 with int8 scales, fp16 d                          W = d·sc·(q − 32), q 0..63
  Q3_K  block 256: 16 sub-blocks, 6-bit scales (sc − 32), fp16 d                         W = d·sc·(q − 4), q 0..7
  Q2_K  block 256: 16 sub-blocks, 4-bit scale and 4-bit min, fp16 d and dmin             W = d·sc·q − dmin·mn, q 0..3
All functions take row-major [rows, cols] arrays and return uint8 [rows, cols / block · bytes per block].
"""
from __future__ import annotations

import numpy as np

QK = 32
QK_K = 256


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    """[..., 1] fp32 -> [..., 2] uint8 (fp16, little endian)."""
    return x.astype(np.float16).view(np.uint8)


def group_to_blocks(p: np.ndarray, group_size: int, block: int) -> np.ndarray:
    """Per-group constants [rows, n_groups] -> per-block [rows, cols / block] (a group of 64 = two 32-blocks)."""
    if group_size % block:
        raise ValueError(f"group size {group_size} is not a multiple of the {block}-element block")
    return np.repeat(p, group_size // block, axis=1)


def recentre_codes(codes: np.ndarray, d: np.ndarray, m: np.ndarray, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Same values, smaller |m|: W = d·q + m = d·(q + k) + (m − k·d) for any per-block integer k keeping the codes
    in 0..qmax. Choosing k nearest m/d shrinks |m| and so its fp16 rounding error (a 2-bit slice in Q4_1 has
    room for k in 0..12). Returns (codes + k, m − k·d)."""
    rows, cols = codes.shape
    q = codes.astype(np.int16).reshape(rows, -1, QK)
    k_lo, k_hi = -q.min(axis=2), qmax - q.max(axis=2)
    d64, m64 = d.astype(np.float64), m.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        k = np.where(d64 == 0, 0, np.floor(m64 / np.where(d64 == 0, 1, d64) + 0.5))
    k = np.clip(k, k_lo, k_hi).astype(np.int16)
    return (q + k[..., None]).reshape(rows, cols).astype(np.uint8), (m64 - k * d64).astype(np.float32)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """[n, 32] codes -> [n, 16] bytes: element j in the low nibble, j + 16 in the high nibble (ggml order)."""
    q = q.reshape(-1, 2, QK // 2)
    return (q[:, 0, :] & 0x0F) | ((q[:, 1, :] & 0x0F) << 4)


def encode_q4_1(codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """codes uint8 [rows, cols] (< 16), d, m fp32 [rows, cols/32] -> Q4_1 bytes. Exact: W = d·q + m."""
    q = codes.astype(np.uint8).reshape(-1, QK)
    out = np.concatenate([_f16_bytes(d.reshape(-1, 1)), _f16_bytes(m.reshape(-1, 1)), _nibbles(q)], axis=1)
    return out.reshape(codes.shape[0], -1)


def encode_q5_1(codes: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """codes uint8 [rows, cols] (< 32), d, m fp32 [rows, cols/32] -> Q5_1 bytes. Exact: W = d·q + m."""
    q = codes.astype(np.uint8).reshape(-1, QK)
    qh = np.packbits((q >> 4) & 1, axis=-1, bitorder="little")  # bit j of the little-endian uint32 = 5th bit of j
    out = np.concatenate([_f16_bytes(d.reshape(-1, 1)), _f16_bytes(m.reshape(-1, 1)), qh, _nibbles(q)], axis=1)
    return out.reshape(codes.shape[0], -1)


def _round(x: np.ndarray) -> np.ndarray:
    return np.floor(x + 0.5)


def fit_symmetric(v: np.ndarray, lo: int, hi: int, iters: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Per row of v [n, k]: scale s and integer codes q in lo..hi minimising ||v − s·q||² (max-abs start, then
    alternating least-squares steps on s; the best of all iterates is kept). Returns (s [n, 1], q [n, k])."""
    amax_i = np.argmax(np.abs(v), axis=1)
    vmax = np.take_along_axis(v, amax_i[:, None], axis=1)
    # ggml's convention: the largest-magnitude value maps to the most negative level (−lo has one more step)
    s = np.where(vmax == 0, 0.0, vmax / lo).astype(np.float64)
    best_s, best_q, best_e = None, None, None
    for _ in range(iters + 1):
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(s == 0, 0, np.clip(_round(v / s), lo, hi))
        e = ((v - s * q) ** 2).sum(axis=1, keepdims=True)
        if best_e is None:
            best_s, best_q, best_e = s, q, e
        else:
            better = e < best_e
            best_s, best_q, best_e = np.where(better, s, best_s), np.where(better, q, best_q), np.minimum(e, best_e)
        qq = (q * q).sum(axis=1, keepdims=True)
        s = np.where(qq == 0, s, (v * q).sum(axis=1, keepdims=True) / np.maximum(qq, 1e-30))
    return best_s, best_q


def encode_q8_0(values: np.ndarray) -> np.ndarray:
    """Nearest Q8_0 of the slice values [rows, cols] (d fitted per 32-block after fp16 rounding)."""
    v = values.astype(np.float64).reshape(-1, QK)
    s, _ = fit_symmetric(v, -128, 127)
    d = s.astype(np.float16).astype(np.float64)  # requantize against the scale the file really holds
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d == 0, 0, np.clip(_round(v / d), -128, 127))
    out = np.concatenate([_f16_bytes(d), q.astype(np.int8).view(np.uint8)], axis=1)
    return out.reshape(values.shape[0], -1)


def _superblock_scales(sub: np.ndarray, qmax: int, signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Sub-block scales sub [n, 16] -> (fp16-rounded super scale d [n, 1], integer sc [n, 16]) with d·sc ≈ sub."""
    ref = np.abs(sub).max(axis=1, keepdims=True)
    d = (ref / qmax).astype(np.float16).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d == 0, 0, _round(sub / d))
    sc = np.clip(sc, -qmax - 1 if signed else 0, qmax)
    return d, sc


def _k_requantize(v: np.ndarray, scale: np.ndarray, offset: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Codes q in lo..hi nearest to v [n, 16, 16] given per-sub-block scale and offset: v ≈ scale·q − offset."""
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(scale == 0, lo, _round((v + offset) / scale))
    return np.clip(q, lo, hi)


def _symmetric_superblocks(values: np.ndarray, lo: int, hi: int, sc_max: int):
    """Q6_K / Q3_K: per 16-element sub-block of values [rows, cols] a scale fitted for codes lo..hi, stored as the
    integer sc [n, 16] (-sc_max-1..sc_max) times the fp16 super scale d [n, 1] of each of the n 256-blocks, and the
    codes re-chosen against d·sc. Returns (d, sc, codes − lo as uint8 [n, 256])."""
    v = values.astype(np.float64).reshape(-1, 16, 16)
    s, _ = fit_symmetric(v.reshape(-1, 16), lo, hi)
    d, sc = _superblock_scales(s.reshape(v.shape[0], 16), sc_max, signed=True)
    q = _k_requantize(v, (d * sc)[..., None], np.zeros((1, 1, 1)), lo, hi).astype(np.int64) - lo
    return d, sc, q.reshape(v.shape[0], QK_K).astype(np.uint8)


def _pack_2bit_planes(q: np.ndarray) -> np.ndarray:
    """[n, 256] 2-bit values -> [n, 64] bytes: element h·128 + j·32 + p in bits 2j of byte h·32 + p."""
    n = q.shape[0]
    x = q.reshape(n, 2, 4, 32).astype(np.uint8)
    return (x[:, :, 0] | (x[:, :, 1] << 2) | (x[:, :, 2] << 4) | (x[:, :, 3] << 6)).reshape(n, 64)


def encode_q6_k(values: np.ndarray) -> np.ndarray:
    """Nearest Q6_K of the slice values [rows, cols], cols % 256 == 0."""
    d, sc, q = _symmetric_superblocks(values, -32, 31, 127)
    lo = (q & 0x0F).reshape(-1, 2, 2, 64)
    ql = (lo[:, :, 0, :] | (lo[:, :, 1, :] << 4)).reshape(q.shape[0], 128)
    out = np.concatenate([ql, _pack_2bit_planes(q >> 4), sc.astype(np.int8).view(np.uint8), _f16_bytes(d)], axis=1)
    return out.reshape(values.shape[0], -1)


def encode_q3_k(values: np.ndarray) -> np.ndarray:
    """Nearest Q3_K of the slice values [rows, cols], cols % 256 == 0."""
    d, sc, q = _symmetric_superblocks(values, -4, 3, 31)  # sc in -32..31
    qs = _pack_2bit_planes(q & 3)
    hbit = ((q >> 2) & 1).reshape(-1, 8, 32)  # bit i of hmask byte p: the third bit of element i·32 + p
    hmask = np.bitwise_or.reduce(hbit << np.arange(8, dtype=np.uint8)[:, None], axis=1)
    s6 = (sc.astype(np.int64) + 32).astype(np.uint8)  # 0..63
    low, high = s6 & 0x0F, s6 >> 4
    lsc = low[:, :8] | (low[:, 8:] << 4)
    hsc = high[:, 0:4] | (high[:, 4:8] << 2) | (high[:, 8:12] << 4) | (high[:, 12:16] << 6)
    out = np.concatenate([hmask, qs, lsc, hsc, _f16_bytes(d)], axis=1)
    return out.reshape(values.shape[0], -1)


def encode_q2_k(values: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Nearest Q2_K of the slice values [rows, cols] (cols % 256 == 0) whose per-element affine constants are
    a, b (W = q·a + b, constant over each 16-element sub-block): sub-block scale ≈ a, min ≈ −b, codes re-chosen
    against the 4-bit-quantized scale and min."""
    v = values.astype(np.float64).reshape(-1, 16, 16)
    n = v.shape[0]
    a_sub = a.astype(np.float64).reshape(n, 16, 16)[:, :, 0]
    mn_sub = np.maximum(-b.astype(np.float64).reshape(n, 16, 16)[:, :, 0], 0.0)
    d, sc = _superblock_scales(a_sub, 15, signed=False)
    dmin, mn = _superblock_scales(mn_sub, 15, signed=False)
    q = _k_requantize(v, (d * sc)[..., None], (dmin * mn)[..., None], 0, 3).reshape(n, QK_K)
    scales = (sc.astype(np.uint8) & 0x0F) | (mn.astype(np.uint8) << 4)
    out = np.concatenate([scales, _pack_2bit_planes(q.astype(np.uint8)), _f16_bytes(d), _f16_bytes(dmin)], axis=1)
    return out.reshape(values.shape[0], -1)
