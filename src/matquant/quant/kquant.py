"""llama.cpp K-quant parameters (and Q8_0) fitted to FIXED codes: the GGUF block that stores a matquant slice as it is.

A matquant r-bit slice is, per group, ŵ = a·q − b with integer codes q (the top r bits of the master). llama.cpp's
K-quants store the same form with quantized parameters, per 256-element super-block:

    Q4_K / Q5_K   8 sub-blocks of 32, q in 0..15 / 0..31:   ŵ = d·sc_s·q − dmin·m_s,  sc_s, m_s in 0..63
    Q2_K          16 sub-blocks of 16, q in 0..3:             ŵ = d·sc_s·q − dmin·m_s,  sc_s, m_s in 0..15
    Q6_K          16 sub-blocks of 16, q in 0..63:            ŵ = d·sc_s·(q − 32),      sc_s in -128..127
    Q3_K          16 sub-blocks of 16, q in 0..7:             ŵ = d·sc_s·(q − 4),       sc_s in -32..31
    Q8_0          blocks of 32 (no super-block), q in 0..255:  ŵ = d·(q − 128)

with d, dmin fp16 per (super-)block. The symmetric formats put the zero at the code mid-point 2^(r−1).

`fit_kquant` keeps the codes and chooses the parameters minimising the importance-weighted squared error

    E = Σ_j imp_j (w_j − ŵ_j)²,     imp_j ≥ 0 (e.g. E[x_j²] = diag(H) of the layer's calibration inputs),

with the parameters as STORED (d, dmin rounded to fp16). Everything a sub-block s contributes to E is in six
importance-weighted moments of its codes and weights, S0 = Σ imp, S1 = Σ imp·q, S2 = Σ imp·q², T0 = Σ imp·w,
T1 = Σ imp·w·q, T2 = Σ imp·w²: with A = d·sc, B = dmin·m,

    E_s(A, B) = T2 − 2A·T1 + 2B·T0 + A²·S2 − 2AB·S1 + B²·S0.

The affine fit (Q2_K, Q4_K, Q5_K):
  0. the naive start (`initial_kquant`, the reference the fit never loses to): per sub-block the weighted least
     squares (a_s, b_s) (closed form 2×2; a sub-block whose codes are all equal takes the super-block's median
     scale and the offset that matches its mean), d = max a_s / sc_max and dmin = max b_s / m_max in fp16, sc, m =
     a_s/d, b_s/dmin rounded and clamped;
  1. scanned starts, for each sign of d and of dmin: the grid d = max a_s / k, dmin = max b_s / k' (fp16) for k, k'
     from half the integer range to its top, sc and m rounded, the grid point of least E kept (the largest
     sub-block need not sit at the top integer; this is what recovers weights that are exactly representable);
  2. from each start, alternate, keeping the best iterate per super-block: the integers given (d, dmin) EXACTLY
     (for each of the sc_max + 1 scales the best integer min is the clamped rounding of the 1-D optimum, E being a
     convex quadratic in m), then (d, dmin) given the integers by the 2×2 weighted least squares over the whole
     super-block, rounded to fp16 and polished over the fp16 neighbours (±1 ulp each).
Signs: llama.cpp's dequantizers (gguf-py's and ggml's C ones, both checked in tests/test_kquant.py) only multiply,
so d and dmin may be negative in the format; sc and m are unsigned. One super-block's offsets b_s = dmin·m_s
therefore share one sign, that of dmin: all-positive weights (value at code 0 above zero) get a negative dmin. The
least-squares step may flip either sign. A sub-block whose best offset has the other sign than its super-block's
gets m = 0 and the error that costs.

The symmetric fits (Q3_K, Q6_K, Q8_0) do the same for the scales alone, on the moments of u = q − mid:
per sub-block A_s = Σ imp·w·u / Σ imp·u², a scanned start d = ±max|A_s|/k, then alternately sc_s given d (exact:
the clamped rounding of the 1-D optimum) and d given sc (1-D least squares, fp16, ±1 ulp); Q8_0 has one fp16 scale
per 32, the fp16 value nearest the optimum or a neighbour. Codes that were made asymmetric (matquant's, with their
own zero point) lose that zero point in these formats.

`dequantize_kquant` computes the values the parameters give with gguf-py's float32 arithmetic (the same products in
the same order), and `encode_kquant` packs them into the GGUF block bytes, so gguf-py's (and llama.cpp's)
dequantizer of those bytes is `dequantize_kquant`: the exported tensor IS the slice, with these parameters.
Only whole super-blocks: a row length that is not a multiple of the block is a ValueError (llama.cpp then falls
back to another type for that tensor; an exporter should too).

Cost: linear in the number of weights; per super-block and start, a grid of (sc_max/2)·(m_max/2) points of the
sub-block moments, then (sc_max + 1) candidates per sub-block and alternation step (the Q4_K fit of a whole layer is
the slowest: seconds per million weights, pure numpy).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class KQuantFormat:
    name: str
    code_bits: int      # r: the codes are 0..2^r − 1
    block: int          # elements per stored block (a super-block for the K-quants)
    sub: int            # elements per sub-block (one sc, m each); == block for Q8_0
    sc_lo: int          # integer sub-block scale range (Q8_0: none, 1..1)
    sc_hi: int
    m_hi: int           # integer min range 0..m_hi (affine formats); 0 = symmetric
    block_bytes: int

    @property
    def affine(self) -> bool:
        return self.m_hi > 0

    @property
    def n_sub(self) -> int:
        return self.block // self.sub

    @property
    def mid(self) -> int:
        """The code the symmetric formats treat as zero (2^(r−1)); 0 for the affine ones."""
        return 0 if self.affine else 1 << (self.code_bits - 1)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block


FORMATS = {f.name: f for f in (
    KQuantFormat("Q2_K", 2, 256, 16, 0, 15, 15, 84),
    KQuantFormat("Q3_K", 3, 256, 16, -32, 31, 0, 110),
    KQuantFormat("Q4_K", 4, 256, 32, 0, 63, 63, 144),
    KQuantFormat("Q5_K", 5, 256, 32, 0, 63, 63, 176),
    KQuantFormat("Q6_K", 6, 256, 16, -128, 127, 0, 210),
    KQuantFormat("Q8_0", 8, 32, 32, 1, 1, 0, 34),
)}
FORMAT_FOR_BITS = {2: "Q2_K", 3: "Q3_K", 4: "Q4_K", 5: "Q5_K", 6: "Q6_K", 8: "Q8_0"}


@dataclass
class KQuantParams:
    """A tensor in one of the FORMATS: codes uint8 [rows, cols] (0..2^r − 1), d (and dmin) float16
    [rows, cols / block], sc (and m) int16 [rows, cols / block, n_sub] (Q8_0: sc all ones, n_sub 1)."""
    fmt: KQuantFormat
    codes: np.ndarray
    d: np.ndarray
    sc: np.ndarray
    dmin: np.ndarray | None = None
    m: np.ndarray | None = None


def _np(x, dtype=None) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def check_shapes(fmt: KQuantFormat, codes, w=None, imp=None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(codes int64 [rows, cols], w float64 or None, imp float64 [cols]) after checking what the format needs."""
    q = _np(codes)
    if q.ndim != 2:
        raise ValueError(f"{fmt.name}: codes must be [rows, cols], got shape {q.shape}")
    rows, cols = q.shape
    if cols % fmt.block:
        raise ValueError(f"{fmt.name} stores whole blocks of {fmt.block}: rows of {cols} elements do not divide "
                         f"(llama.cpp falls back to another type for such a tensor)")
    q = q.astype(np.int64)
    if q.size and (q.min() < 0 or q.max() >= 1 << fmt.code_bits):
        raise ValueError(f"{fmt.name} codes must be in 0..{(1 << fmt.code_bits) - 1}, got {q.min()}..{q.max()}")
    wf = None
    if w is not None:
        wf = _np(w, np.float64)
        if wf.shape != q.shape:
            raise ValueError(f"weights {wf.shape} and codes {q.shape} differ in shape")
    if imp is None:
        im = np.ones(cols)
    else:
        im = _np(imp, np.float64).reshape(-1)
        if im.shape != (cols,):
            raise ValueError(f"importance must have one value per column ({cols}), got shape {im.shape}")
        if (im < 0).any() or not np.isfinite(im).all():
            raise ValueError("importance must be finite and >= 0")
    return q, wf, im


def _f16(x: np.ndarray) -> np.ndarray:
    """Round to the nearest fp16 (what the file stores), back in float64; values beyond fp16 are clipped."""
    return np.clip(x, -65504.0, 65504.0).astype(np.float16).astype(np.float64)


def _f16_neighbours(x: np.ndarray) -> list[np.ndarray]:
    """x (already fp16 values) and its two fp16 neighbours."""
    h = x.astype(np.float16)
    return [x, np.nextafter(h, np.float16(-np.inf)).astype(np.float64),
            np.nextafter(h, np.float16(np.inf)).astype(np.float64)]


def _round(x: np.ndarray) -> np.ndarray:
    return np.floor(x + 0.5)


# ---------------------------------------------------------------------------------------------------------------
# dequantization (gguf-py's arithmetic)

def dequantize_kquant(p: KQuantParams) -> np.ndarray:
    """float32 [rows, cols]: the values the parameters give, in gguf-py's float32 order of operations
    ((d·sc)·q − dmin·m; (d·sc)·(q − mid); (q − 128)·d for Q8_0)."""
    f = p.fmt
    rows, cols = p.codes.shape
    q = p.codes.astype(np.float32).reshape(rows, cols // f.block, f.n_sub, f.sub)
    d = p.d.astype(np.float16).astype(np.float32)[..., None, None]
    if f.name == "Q8_0":
        return ((q - np.float32(128)) * d).reshape(rows, cols)
    dl = d * p.sc.astype(np.float32)[..., None]
    if not f.affine:
        return (dl * (q - np.float32(f.mid))).reshape(rows, cols)
    ml = p.dmin.astype(np.float16).astype(np.float32)[..., None, None] * p.m.astype(np.float32)[..., None]
    return (dl * q - ml).reshape(rows, cols)


def kquant_error(p: KQuantParams, w, imp=None) -> np.ndarray:
    """Per row Σ_j imp_j (w_j − ŵ_j)² of the stored parameters (float64 [rows])."""
    _, wf, im = check_shapes(p.fmt, p.codes, w, imp)
    return (im * (wf - dequantize_kquant(p).astype(np.float64)) ** 2).sum(axis=1)


# ---------------------------------------------------------------------------------------------------------------
# the affine fit (Q2_K, Q4_K, Q5_K), on the sub-block moments

def _moments(f: KQuantFormat, q: np.ndarray, w: np.ndarray, imp: np.ndarray):
    """S0, S1, S2, T0, T1, T2, each [N, n_sub] over the N = rows · cols/block super-blocks (u = q − mid)."""
    rows, cols = q.shape
    shp = (rows * (cols // f.block), f.n_sub, f.sub)
    u = (q - f.mid).astype(np.float64).reshape(shp)
    x = w.reshape(shp)
    i = np.broadcast_to(imp.reshape(1, cols // f.block, f.n_sub, f.sub), (rows, cols // f.block, f.n_sub, f.sub))
    i = i.reshape(shp)
    iu, ix = i * u, i * x
    return i.sum(-1), iu.sum(-1), (iu * u).sum(-1), ix.sum(-1), (iu * x).sum(-1), (ix * x).sum(-1)


def _affine_error(M, A, B) -> np.ndarray:
    """Σ over sub-blocks of E_s(A, B) per super-block [N] (A, B broadcastable to [N, n_sub])."""
    S0, S1, S2, T0, T1, T2 = M
    return (T2 - 2 * A * T1 + 2 * B * T0 + A * A * S2 - 2 * A * B * S1 + B * B * S0).sum(-1)


def _subblock_ls(M) -> tuple[np.ndarray, np.ndarray]:
    """Per sub-block weighted least squares ŵ = a·q − b: a·S2 − b·S1 = T1, −a·S1 + b·S0 = −T0. A sub-block with
    constant codes (or no weight) has no unique a: it takes the median a of its super-block's other sub-blocks (0
    if none) and b = (a·S1 − T0)/S0, which matches its weighted mean."""
    S0, S1, S2, T0, T1, _ = M
    det = S0 * S2 - S1 * S1
    ok = det > 1e-9 * np.maximum(S0 * S2, 1e-300)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.where(ok, (T1 * S0 - T0 * S1) / np.where(ok, det, 1), np.nan)
    med = np.zeros_like(a[:, :1])
    some = ok.any(axis=1)  # super-blocks with at least one sub-block that determines its scale
    if some.any():
        med[some] = np.nanmedian(np.where(ok[some], a[some], np.nan), axis=1, keepdims=True)
    a = np.where(ok, a, med)
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.where(S0 > 0, (a * S1 - T0) / np.where(S0 > 0, S0, 1), 0.0)
    return a, b


def _scale_from(v: np.ndarray, hi: int, sign: float) -> np.ndarray:
    """fp16 super scale for sub-block values v [N, n_sub] (signed toward `sign`): sign · max(sign·v, 0) / hi."""
    return _f16(sign * np.maximum(sign * v, 0).max(axis=1, keepdims=True) / hi)


def _ints_from(v: np.ndarray, d: np.ndarray, lo: int, hi: int) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.clip(np.where(d == 0, 0, _round(v / np.where(d == 0, 1, d))), lo, hi)


def _best_ints(M, d: np.ndarray, dmin: np.ndarray, f: KQuantFormat) -> tuple[np.ndarray, np.ndarray]:
    """The integers (sc, m) minimising E_s for given d, dmin [N, 1]: for every sc in 0..sc_hi the best m is the
    clamped rounding of argmin_m E_s = (d·sc·S1 − T0)/(dmin·S0) (a 1-D convex quadratic), then the best sc."""
    S0, S1, S2, T0, T1, _ = (x[..., None] for x in M)
    sc = np.arange(f.sc_lo, f.sc_hi + 1, dtype=np.float64)
    A = d[..., None] * sc                       # [N, 1, K]
    dm = dmin[..., None]
    den = dm * S0
    with np.errstate(divide="ignore", invalid="ignore"):
        m = np.where(den != 0, _round((A * S1 - T0) / np.where(den != 0, den, 1)), 0)
    m = np.clip(m, 0, f.m_hi)
    B = dm * m
    E = -2 * A * T1 + 2 * B * T0 + A * A * S2 - 2 * A * B * S1 + B * B * S0
    k = E.argmin(axis=-1)[..., None]
    return np.take_along_axis(np.broadcast_to(sc, E.shape), k, -1)[..., 0], np.take_along_axis(m, k, -1)[..., 0]


def _best_super(M, sc: np.ndarray, m: np.ndarray, d: np.ndarray, dmin: np.ndarray):
    """(d, dmin) [N, 1] by weighted least squares given integer sc, m [N, n_sub]:
    [Σ sc²S2, −Σ sc·m·S1; −Σ sc·m·S1, Σ m²S0] (d, dmin) = (Σ sc·T1, −Σ m·T0); a singular system (all m = 0, or all
    sc = 0) solves for the one that matters and keeps the other."""
    S0, S1, S2, T0, T1, _ = M
    a11 = (sc * sc * S2).sum(1, keepdims=True)
    a12 = -(sc * m * S1).sum(1, keepdims=True)
    a22 = (m * m * S0).sum(1, keepdims=True)
    r1 = (sc * T1).sum(1, keepdims=True)
    r2 = -(m * T0).sum(1, keepdims=True)
    det = a11 * a22 - a12 * a12
    ok = det > 1e-12 * np.maximum(a11 * a22, 1e-300)
    with np.errstate(divide="ignore", invalid="ignore"):
        d2 = np.where(ok, (r1 * a22 - r2 * a12) / np.where(ok, det, 1), np.nan)
        m2 = np.where(ok, (a11 * r2 - a12 * r1) / np.where(ok, det, 1), np.nan)
        d1 = np.where(a11 > 0, (r1 - a12 * dmin) / np.where(a11 > 0, a11, 1), d)    # dmin kept
        m1 = np.where(a22 > 0, (r2 - a12 * d) / np.where(a22 > 0, a22, 1), dmin)    # d kept
    d_new = np.where(ok, d2, np.where(a11 > 0, d1, d))
    m_new = np.where(ok, m2, np.where(a22 > 0, np.where(a11 > 0, dmin, m1), dmin))
    return _f16(d_new), _f16(m_new)


def _polish_super(M, sc, m, d, dmin):
    """The best of the 3×3 fp16 neighbours of (d, dmin) for the integers sc, m."""
    best_d, best_m, best_e = d, dmin, _affine_error(M, d * sc, dmin * m)
    for dd in _f16_neighbours(d):
        for mm in _f16_neighbours(dmin):
            e = _affine_error(M, dd * sc, mm * m)
            better = (e < best_e)[:, None]
            best_d, best_m = np.where(better, dd, best_d), np.where(better, mm, best_m)
            best_e = np.minimum(e, best_e)
    return best_d, best_m


SCAN_FROM = 0.5  # the start scans the integer of the largest sub-block value from its maximum down to half of it


def _scan_range(hi: int) -> np.ndarray:
    return np.arange(int(np.ceil(hi * SCAN_FROM)), hi + 1, dtype=np.float64)


def _affine_start(M, f: KQuantFormat, sign_d: float, sign_m: float):
    """The best (by E) of the grid d = sign_d·max_s(sign_d·a_s)/k, dmin = sign_m·max_s(sign_m·b_s)/k' (fp16), for
    k, k' from half the integer range to its top, with sc, m the rounded sub-block (a_s, b_s): the largest
    sub-block value need not sit at the top integer (it does not when the weights came from such a grid)."""
    S0, S1, S2, T0, T1, T2 = (x[..., None] for x in M)
    a, b = _subblock_ls(M)
    amax = np.maximum(sign_d * a, 0).max(1, keepdims=True)
    bmax = np.maximum(sign_m * b, 0).max(1, keepdims=True)
    dmin = _f16(sign_m * bmax / _scan_range(f.m_hi))                # [N, K']
    m = _ints_from(b[..., None], dmin[:, None, :], 0, f.m_hi)       # [N, n_sub, K']
    B = dmin[:, None, :] * m
    best_e = best = None
    for k in _scan_range(f.sc_hi):
        d = _f16(sign_d * amax / k)
        sc = _ints_from(a, d, 0, f.sc_hi)
        A = (d * sc)[..., None]
        e = (T2 - 2 * A * T1 + 2 * B * T0 + A * A * S2 - 2 * A * B * S1 + B * B * S0).sum(1)   # [N, K']
        j = e.argmin(1)[:, None]
        e = np.take_along_axis(e, j, 1)[:, 0]
        cand = (d, np.take_along_axis(dmin, j, 1), sc, np.take_along_axis(m, j[:, None, :], 2)[..., 0])
        if best is None:
            best, best_e = cand, e
        else:
            b1 = (e < best_e)[:, None]
            best = tuple(np.where(b1, x, y) for x, y in zip(cand, best))
            best_e = np.minimum(e, best_e)
    return best


def _majority_sign(v: np.ndarray) -> np.ndarray:
    """+1 where the largest positive value is at least the largest negative magnitude, else −1 ([N, 1])."""
    return np.where(v.max(axis=1, keepdims=True) >= -v.min(axis=1, keepdims=True), 1.0, -1.0)


def _naive_affine(M, f: KQuantFormat):
    """The start with the signs of d and dmin taken from the sub-block value of largest magnitude."""
    a, b = _subblock_ls(M)
    sd, sm = _majority_sign(a), _majority_sign(b)
    d = _f16(sd * np.maximum(sd * a, 0).max(1, keepdims=True) / f.sc_hi)
    dmin = _f16(sm * np.maximum(sm * b, 0).max(1, keepdims=True) / f.m_hi)
    return d, dmin, _ints_from(a, d, 0, f.sc_hi), _ints_from(b, dmin, 0, f.m_hi)


def _signs(v: np.ndarray) -> tuple[float, ...]:
    """The signs of the super scale worth scanning for sub-block values v: with every v of one sign the other sign
    can only give all-zero integers (a slice's scales a = α·2^s are all positive), so it is skipped."""
    if (v >= 0).all():
        return (1.0,)
    if (v <= 0).all():
        return (-1.0,)
    return (1.0, -1.0)


def _fit_affine(M, f: KQuantFormat, iters: int):
    best = _naive_affine(M, f)
    best_e = _affine_error(M, best[0] * best[2], best[1] * best[3])
    a, b = _subblock_ls(M)
    for sign_d in _signs(a):
        for sign_m in _signs(b):
            d, dmin, sc, m = _affine_start(M, f, sign_d, sign_m)
            for it in range(iters + 1):
                if it:
                    d, dmin = _best_super(M, sc, m, d, dmin)
                    d, dmin = _polish_super(M, sc, m, d, dmin)
                sc, m = _best_ints(M, d, dmin, f)
                e = _affine_error(M, d * sc, dmin * m)
                better = e < best_e
                b1 = better[:, None]
                best = (np.where(b1, d, best[0]), np.where(b1, dmin, best[1]),
                        np.where(b1, sc, best[2]), np.where(b1, m, best[3]))
                best_e = np.minimum(e, best_e)
    return best


# ---------------------------------------------------------------------------------------------------------------
# the symmetric fit (Q3_K, Q6_K, Q8_0): A = d·sc per sub-block, ŵ = A·(q − mid)

def _sym_error(M, A) -> np.ndarray:
    S0, S1, S2, T0, T1, T2 = M
    return (T2 - 2 * A * T1 + A * A * S2).sum(-1)


def _sym_subblock_ls(M) -> np.ndarray:
    S2, T1 = M[2], M[4]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(S2 > 0, T1 / np.where(S2 > 0, S2, 1), 0.0)


def _naive_sym(M, f: KQuantFormat):
    a = _sym_subblock_ls(M)
    if f.name == "Q8_0":
        return _f16(a), np.ones_like(a)
    d = _f16(np.abs(a).max(1, keepdims=True) / f.sc_hi)
    return d, _ints_from(a, d, f.sc_lo, f.sc_hi)


def _fit_symmetric(M, f: KQuantFormat, iters: int):
    S2, T1 = M[2], M[4]
    d, sc = _naive_sym(M, f)
    if f.name == "Q8_0":  # one scale per block: the fp16 value nearest the optimum, or a neighbour
        best_d, best_e = d, _sym_error(M, d)
        for dd in _f16_neighbours(d):
            e = _sym_error(M, dd)
            best_d, best_e = np.where((e < best_e)[:, None], dd, best_d), np.minimum(e, best_e)
        return best_d, sc
    best_d, best_sc, best_e = d, sc, _sym_error(M, d * sc)
    a = _sym_subblock_ls(M)
    amax = np.abs(a).max(1, keepdims=True)
    top = max(f.sc_hi, -f.sc_lo)
    for sign in (1.0, -1.0):
        # start: the best of d = sign·max|a|/k (fp16) for k from half the range to its top, sc rounded (clamped)
        ds = _f16(sign * amax / _scan_range(top))                                    # [N, K]
        scs = _ints_from(a[..., None], ds[:, None, :], f.sc_lo, f.sc_hi)             # [N, n_sub, K]
        A = ds[:, None, :] * scs
        e = (M[5][..., None] - 2 * A * T1[..., None] + A * A * S2[..., None]).sum(1)
        j = e.argmin(1)[:, None]
        d, sc = np.take_along_axis(ds, j, 1), np.take_along_axis(scs, j[:, None, :], 2)[..., 0]
        for it in range(iters + 1):
            if it:
                num, den = (sc * T1).sum(1, keepdims=True), (sc * sc * S2).sum(1, keepdims=True)
                with np.errstate(divide="ignore", invalid="ignore"):
                    d = _f16(np.where(den > 0, num / np.where(den > 0, den, 1), d))
                e0 = _sym_error(M, d * sc)
                for dd in _f16_neighbours(d):
                    e = _sym_error(M, dd * sc)
                    d, e0 = np.where((e < e0)[:, None], dd, d), np.minimum(e, e0)
            with np.errstate(divide="ignore", invalid="ignore"):
                den = d * S2
                sc = np.clip(np.where(den != 0, _round(T1 / np.where(den != 0, den, 1)), 0), f.sc_lo, f.sc_hi)
            e = _sym_error(M, d * sc)
            b1 = (e < best_e)[:, None]
            best_d, best_sc, best_e = np.where(b1, d, best_d), np.where(b1, sc, best_sc), np.minimum(e, best_e)
    return best_d, best_sc


# ---------------------------------------------------------------------------------------------------------------
# public fit

ROW_CHUNK = 64  # rows per batch of the fit: the [N, n_sub, sc_hi + 1] integer search is the largest array


def _params(f, q, rows, parts) -> KQuantParams:
    nb = q.shape[1] // f.block

    def cat(i, dtype, shape):
        return np.concatenate([p[i] for p in parts]).reshape(shape).astype(dtype)
    d = cat(0, np.float16, (rows, nb))
    if f.affine:
        return KQuantParams(f, q.astype(np.uint8), d, cat(2, np.int16, (rows, nb, f.n_sub)),
                            cat(1, np.float16, (rows, nb)), cat(3, np.int16, (rows, nb, f.n_sub)))
    return KQuantParams(f, q.astype(np.uint8), d, cat(1, np.int16, (rows, nb, f.n_sub)))


def _fit(fmt: str, codes, w, imp, iters: int | None) -> KQuantParams:
    if fmt not in FORMATS:
        raise ValueError(f"unknown K-quant format {fmt!r}; choose one of {', '.join(FORMATS)}")
    f = FORMATS[fmt]
    q, wf, im = check_shapes(f, codes, w, imp)
    if wf is None:
        raise ValueError("fitting needs the target weights")
    parts = []
    for r0 in range(0, q.shape[0], ROW_CHUNK):
        M = _moments(f, q[r0:r0 + ROW_CHUNK], wf[r0:r0 + ROW_CHUNK], im)
        if iters is None:
            parts.append(_naive_affine(M, f) if f.affine else _naive_sym(M, f))
        else:
            parts.append(_fit_affine(M, f, iters) if f.affine else _fit_symmetric(M, f, iters))
    return _params(f, q, q.shape[0], parts)


def fit_kquant(fmt: str, codes, w, imp=None, iters: int = 4) -> KQuantParams:
    """The parameters of format `fmt` (a FORMATS name) for the FIXED codes [rows, cols] (0..2^r − 1, r the
    format's code width; cols a multiple of its block) minimising Σ_j imp_j (w_j − ŵ_j)² per row, as stored
    (fp16 d, dmin). imp [cols] >= 0, None = uniform. Never worse on this objective than `initial_kquant`."""
    return _fit(fmt, codes, w, imp, iters)


def initial_kquant(fmt: str, codes, w, imp=None) -> KQuantParams:
    """The naive start: per sub-block weighted least squares, then d = max/sc_max (fp16), integers rounded."""
    return _fit(fmt, codes, w, imp, None)


# ---------------------------------------------------------------------------------------------------------------
# GGUF block bytes (layouts as gguf-py's dequantizers read them)

def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _pack_2bit(v: np.ndarray) -> np.ndarray:
    """[n, 256] 2-bit values -> [n, 64]: element h·128 + j·32 + p in bits 2j..2j+1 of byte h·32 + p."""
    x = v.reshape(v.shape[0], 2, 4, 32).astype(np.uint8)
    return (x[:, :, 0] | (x[:, :, 1] << 2) | (x[:, :, 2] << 4) | (x[:, :, 3] << 6)).reshape(v.shape[0], 64)


def _pack_bitplane(v: np.ndarray) -> np.ndarray:
    """[n, 256] bits -> [n, 32]: element i·32 + p in bit i of byte p."""
    x = v.reshape(v.shape[0], 8, 32).astype(np.uint8)
    return np.bitwise_or.reduce(x << np.arange(8, dtype=np.uint8)[:, None], axis=1)


def _pack_nibbles_32(v: np.ndarray) -> np.ndarray:
    """[n, 256] 4-bit values -> [n, 128]: element c·64 + l low nibble, c·64 + 32 + l high nibble of byte c·32 + l."""
    x = v.reshape(v.shape[0], 4, 2, 32).astype(np.uint8)
    return (x[:, :, 0] | (x[:, :, 1] << 4)).reshape(v.shape[0], 128)


def _pack_scale_min_6bit(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K's 12 bytes of eight 6-bit scales and mins: bytes 0-3 sc[0:4] + the top 2 bits of sc[4:8],
    4-7 m[0:4] + the top 2 bits of m[4:8], 8-11 the low nibbles of sc[4:8] and m[4:8]."""
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    b0 = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    b1 = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    b2 = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    return np.concatenate([b0, b1, b2], axis=1)


def encode_kquant(p: KQuantParams) -> np.ndarray:
    """uint8 [rows, cols / block · block_bytes]: the GGUF bytes of p, row-major (gguf-py's / ggml's layout)."""
    f = p.fmt
    rows, cols = p.codes.shape
    n = rows * (cols // f.block)
    q = p.codes.astype(np.uint8).reshape(n, f.block)
    d = _f16_bytes(p.d)
    if f.name == "Q8_0":
        out = np.concatenate([d, (q.astype(np.int16) - 128).astype(np.int8).view(np.uint8)], axis=1)
        return out.reshape(rows, -1)
    sc = p.sc.reshape(n, f.n_sub)
    if f.name in ("Q4_K", "Q5_K"):
        head = [d, _f16_bytes(p.dmin), _pack_scale_min_6bit(sc, p.m.reshape(n, f.n_sub))]
        body = [_pack_nibbles_32(q & 0x0F)]
        if f.name == "Q5_K":  # the fifth bit of element i·32 + p in bit i of qh byte p, before the nibbles
            body = [_pack_bitplane(q >> 4)] + body
        out = np.concatenate(head + body, axis=1)
    elif f.name == "Q2_K":
        scales = sc.astype(np.uint8) | (p.m.reshape(n, f.n_sub).astype(np.uint8) << 4)
        out = np.concatenate([scales, _pack_2bit(q), d, _f16_bytes(p.dmin)], axis=1)
    elif f.name == "Q3_K":  # stored value q (0..7) = signed code + 4: low 2 bits in qs, the third bit in hmask
        s6 = (sc.astype(np.int16) + 32).astype(np.uint8)
        low, high = s6 & 0x0F, s6 >> 4
        scales = np.concatenate([low[:, :8] | (low[:, 8:] << 4),
                                 high[:, 0:4] | (high[:, 4:8] << 2) | (high[:, 8:12] << 4) | (high[:, 12:16] << 6)],
                                axis=1)
        out = np.concatenate([_pack_bitplane((q >> 2) & 1), _pack_2bit(q & 3), scales, d], axis=1)
    elif f.name == "Q6_K":  # element h·128 + k·64 + l: nibble k of ql byte h·64 + l; its top 2 bits in 2-bit planes
        lo = (q & 0x0F).reshape(n, 2, 2, 64)
        ql = (lo[:, :, 0] | (lo[:, :, 1] << 4)).reshape(n, 128)
        out = np.concatenate([ql, _pack_2bit(q >> 4), sc.astype(np.int8).view(np.uint8), d], axis=1)
    else:  # pragma: no cover - FORMATS is closed
        raise ValueError(f.name)
    return out.reshape(rows, -1)
