"""MatGPTQ's code choice: for each weight the int-c master code that minimises the λ-weighted error of every
requested slice, and the residual the column loop feeds back.

Per weight w the code q minimises Σ_r λ_r (w − deq_r(q))² over all 2^c codes, where deq_r(q) = α·(S_r(q) − z) and
S_r is the slicing mode's value in master units (`matquant.quant.slicing.slice_master`: paper / nested / extra).
Since every slice shares α and z, the objective is α²·(Λu² − 2u·A_q + B_q) with u = w/α + z,
A_q = Σ λ_r S_r(q), B_q = Σ λ_r S_r(q)², Λ = Σ λ_r: the argmin over q depends only on u and is the lower
envelope of 2^c lines in u. It is computed once per (c, R, λ, mode) and looked up by a bucketed search
(`BucketIndex`), so the search over all 2^c codes costs a few table look-ups per weight (the tests check it
against the exhaustive argmin).

Error feedback: the residual fed to the remaining columns is a mean over the slices of w − deq_r(q): `weighted`
(by λ, the objective's own weights) or `mean` (plain average over R), or `master` (only the int-c residual, i.e.
the sliced-int-c GPTQ update with the multi-slice code choice).
"""
from __future__ import annotations

from functools import lru_cache

import torch

from matquant.quant.minmax import check_bits
from matquant.quant.slicing import DEFAULT_SLICING, check_slicing, slice_master

DEFAULT_BITS = (8, 4, 3, 2)
# The defaults chosen from the measurements in docs/results.md, "MatGPTQ variants" (the numbers live there): with
# λ-weighted feedback, R={8,4,3,2} λ=(16,4,2,1) gave the best int4/int3/int2 of the variants tried; R={8,4,2}
# λ=(16,4,1) keeps int8 closer; the QAT weights (0.1,0.1,1) wreck the int8 master in one-shot PTQ. Other R: all-ones.
DEFAULT_LAMBDAS = {(8, 4, 3, 2): (16.0, 4.0, 2.0, 1.0), (8, 4, 2): (16.0, 4.0, 1.0)}
ERROR_FEEDBACK = ("weighted", "mean", "master")
DEFAULT_ERROR_FEEDBACK = "weighted"  # with DEFAULT_LAMBDAS, the best measured (docs/results.md)


def resolve_bits_lambdas(master_bits: int, bits_list=None, lambdas=None) -> tuple[tuple[int, ...], tuple[float, ...]]:
    if bits_list is None:  # the default R, cut to the master precision (e.g. master 6: 6,4,3,2)
        bits_list = DEFAULT_BITS if master_bits == DEFAULT_BITS[0] else \
            (master_bits,) + tuple(b for b in DEFAULT_BITS if b < master_bits)
    bits = tuple(int(b) for b in bits_list)
    for b in bits:
        check_bits(b, "slice bits")
        if b > master_bits:
            raise ValueError(f"slice precision {b} exceeds the master bits {master_bits}; use --bits-list values "
                             f"<= --bits-master.")
    if len(set(bits)) != len(bits):
        raise ValueError(f"--bits-list has duplicates: {list(bits)}")
    if lambdas is None:
        lam = DEFAULT_LAMBDAS.get(bits, (1.0,) * len(bits))
    else:
        lam = tuple(float(x) for x in lambdas)
        if len(lam) != len(bits):
            raise ValueError(f"--lambdas has {len(lam)} values but --bits-list has {len(bits)}; give one weight "
                             "per precision.")
    if any(not (x >= 0) for x in lam) or sum(lam) <= 0:
        raise ValueError(f"--lambdas must be >= 0 with a positive sum, got {list(lam)}")
    return bits, lam


@lru_cache(maxsize=64)
def _tables(c: int, bits: tuple, lam: tuple, mode: str):
    codes = torch.arange(2**c)
    S = torch.stack([slice_master(codes, c, r, mode).double() for r in bits])  # [R, 2^c] master units
    lt = torch.tensor(lam, dtype=torch.float64)[:, None]
    A = (lt * S).sum(0)
    B = (lt * S * S).sum(0)
    return S, A, B


@lru_cache(maxsize=64)
def envelope(c: int, bits: tuple, lam: tuple, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(breakpoints [K-1] float64, codes [K] long): argmin_q f_q(u) = codes[searchsorted(breakpoints, u)].

    f_q(u) = B_q − 2u·A_q. A_q is non-decreasing in q for every slicing mode, so the lines come sorted by
    decreasing slope; the standard lower-envelope scan keeps, for equal A, the smallest B (and the smallest q,
    which is also what argmin returns on ties).
    """
    _, A, B = _tables(c, bits, lam, mode)
    m, b = (-2 * A).tolist(), B.tolist()
    hull: list[int] = []

    def x(i, j):  # u where lines i and j cross (slopes differ)
        return (b[j] - b[i]) / (m[i] - m[j])

    for q in range(len(m)):
        if hull and m[hull[-1]] == m[q]:
            if b[q] >= b[hull[-1]]:
                continue
            hull.pop()
        while len(hull) >= 2 and x(hull[-2], q) <= x(hull[-2], hull[-1]):
            hull.pop()
        hull.append(q)
    brk = torch.tensor([x(hull[k], hull[k + 1]) for k in range(len(hull) - 1)], dtype=torch.float64)
    return brk, torch.tensor(hull, dtype=torch.long)


def _take(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """table[idx] for a 1-D table (index_select: much faster than advanced indexing on CPU)."""
    return table.index_select(0, idx.reshape(-1)).view(idx.shape)


class BucketIndex:
    """Exact `torch.searchsorted(brk, u)` (the number of breakpoints < u) for a fixed sorted `brk`, as one table
    gather plus a few compare-and-step corrections: u's cell of a uniform grid over [brk[0], brk[-1]] gives the
    count below the cell's left edge, and each correction step adds one breakpoint of the cell that lies below u.
    The grid is refined until no cell holds more than `MAX_STEPS` breakpoints. Faster than the binary search on CPU
    (MatGPTQ's code choice calls it for every candidate of the clipping search; timing in docs/results.md)."""

    MAX_STEPS = 3

    def __init__(self, brk: torch.Tensor):
        self.brk = brk.double()
        n = brk.numel()
        self.lo = float(brk[0]) if n else 0.0
        span = float(brk[-1]) - self.lo if n else 0.0
        cells = max(64, 4 * n)
        while True:
            self.inv = cells / span if span > 0 else 0.0
            edges = self.lo + torch.arange(cells, dtype=torch.float64) / self.inv if span > 0 else \
                torch.full((1,), self.lo, dtype=torch.float64)
            self.count = torch.searchsorted(self.brk, edges)  # breakpoints < each cell's left edge
            per_cell = torch.diff(torch.cat([self.count, torch.tensor([n])]))
            if n == 0 or int(per_cell.max()) <= self.MAX_STEPS or cells >= 1 << 22:
                break
            cells *= 4
        self.steps = int(per_cell.max()) if n else 0
        self.ncell = self.count.numel()
        self.pad = torch.cat([self.brk, torch.tensor([float("inf")], dtype=torch.float64)])  # brk[n] never < u

    def to(self, device) -> "BucketIndex":
        out = object.__new__(BucketIndex)
        out.__dict__.update(self.__dict__)
        out.brk, out.count, out.pad = self.brk.to(device), self.count.to(device), self.pad.to(device)
        return out

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        ud = u.double()
        cell = ((ud - self.lo) * self.inv).floor_().nan_to_num_(0.0).clamp_(0, self.ncell - 1).long()
        idx = _take(self.count, cell)
        for _ in range(self.steps):
            idx += _take(self.pad, idx) < ud
        if u.dtype.is_floating_point:
            idx = torch.where(torch.isnan(ud), self.brk.numel(), idx)  # as searchsorted: NaN sorts last
        return idx


class MultiSliceRounder:
    """Code choice and feedback value of MatGPTQ for one (c, R, λ, slicing mode, feedback rule)."""

    def __init__(self, master_bits: int, bits=DEFAULT_BITS, lambdas=None, mode: str = DEFAULT_SLICING,
                 error_feedback: str = DEFAULT_ERROR_FEEDBACK):
        check_slicing(mode)
        if error_feedback not in ERROR_FEEDBACK:
            raise ValueError(f"error feedback must be one of {', '.join(ERROR_FEEDBACK)}, got {error_feedback!r}")
        self.c = master_bits
        self.bits, self.lam = resolve_bits_lambdas(master_bits, bits, lambdas)
        self.mode = mode
        S, A, _ = _tables(self.c, self.bits, self.lam, mode)
        self._brk, self._codes = envelope(self.c, self.bits, self.lam, mode)
        self._index = BucketIndex(self._brk)
        if error_feedback == "weighted":
            fb = A / sum(self.lam)
        elif error_feedback == "mean":
            fb = S.mean(0)
        else:
            fb = torch.arange(2**self.c, dtype=torch.float64)
        self._fb = fb.float()
        self._dev = None

    def _on(self, device):
        if self._dev != device:
            self._index_d = self._index.to(device)
            self._codes_d, self._fb_d = self._codes.to(device), self._fb.to(device)
            self._dev = device

    def codes(self, u: torch.Tensor) -> torch.Tensor:
        """argmin over all 2^c codes of Σ_r λ_r (u − S_r(q))² (u in master code units), via the envelope."""
        self._on(u.device)
        return _take(self._codes_d, self._index_d(u))

    def round(self, w, scale, zero):
        u = w / scale + zero
        q = self.codes(u)
        return q, scale * (_take(self._fb_d, q) - zero)
