"""MatGPTQ: one-shot multi-precision GPTQ (after arXiv 2602.03537) in matquant's checkpoint format.

Same column loop as GPTQ (`gptq.gptq_columns`), two changes:

1. **Code choice.** Each weight w gets the int-c master code q that minimises the λ-weighted error of *all*
   requested slices, Σ_r λ_r (w − deq_r(q))², over all 2^c codes, where deq_r(q) = α·(S_r(q) − z) and S_r is
   the slicing mode's value in master units (`matquant.quant.slicing.slice_master`: paper / nested / extra).
   Since every slice shares α and z, the objective is α²·(Λu² − 2u·A_q + B_q) with u = w/α + z,
   A_q = Σ λ_r S_r(q), B_q = Σ λ_r S_r(q)², Λ = Σ λ_r: the argmin over q depends only on u and is the lower
   envelope of 2^c lines in u. It is computed once per (c, R, λ, mode) and looked up with a binary search,
   so the search over all 2^c codes costs O(log 2^c) per weight (`codes_bruteforce` is the exhaustive reference,
   and the tests check both agree).
2. **Error feedback.** The residual fed to the remaining columns is a mean over the slices of w − deq_r(q):
   `weighted` (by λ, the objective's own weights) or `mean` (plain average over R), or `master` (only the int-c
   residual, i.e. the sliced-int-c GPTQ update with the multi-slice code choice).

Group parameters (α, z), fixed when the column loop reaches a group (as in GPTQ):
- `minmax`: MinMax at c bits, the baseline;
- `search`: per row, the (α, z) among MinMax ranges whose low / high ends are scaled by a small grid of factors
  (shrink = clipping, stretch = room for the low slices' coarse grid) that minimises the same λ-weighted
  multi-slice error of the group's round-to-nearest codes. In `paper` mode the top int-r level of an int-c code
  is 2^c − 2^(c−r) (e.g. 192 of 255 for int2 from int8), so MinMax leaves the top quarter of a group's range
  without an int2 level; in `nested` mode both ends lose half a bucket. Stretching the range fixes that at a
  small int-c cost; the search picks the trade-off the λ's ask for.
"""
from __future__ import annotations

from functools import lru_cache

import torch

from matquant.algorithms.gptq import DEFAULT_BLOCKSIZE, blockwise_hessian_method, gptq_columns
from matquant.algorithms.slice_params import DEFAULT_SLICE_PARAMS, check_slice_params, with_slice_params
from matquant.quant.clip_search import DEFAULT_CLIP, check_clip, check_clip_lambdas
from matquant.quant.minmax import QuantizedWeight, affine_params, check_bits, resolve_group_size, symmetric_scale
from matquant.quant.refit import refit_params
from matquant.quant.slicing import DEFAULT_SLICING, check_slicing, slice_master

DEFAULT_BITS = (8, 4, 3, 2)
# The defaults chosen from the measurements in docs/results.md, "MatGPTQ variants" (the numbers live there): with
# λ-weighted feedback, R={8,4,3,2} λ=(16,4,2,1) gave the best int4/int3/int2 of the variants tried; R={8,4,2}
# λ=(16,4,1) keeps int8 closer; the QAT weights (0.1,0.1,1) wreck the int8 master in one-shot PTQ. Other R: all-ones.
DEFAULT_LAMBDAS = {(8, 4, 3, 2): (16.0, 4.0, 2.0, 1.0), (8, 4, 2): (16.0, 4.0, 1.0)}
ERROR_FEEDBACK = ("weighted", "mean", "master")
GROUP_PARAMS = ("minmax", "search")
DEFAULT_ERROR_FEEDBACK = "weighted"  # with DEFAULT_LAMBDAS; measured best in docs/results.md
DEFAULT_GROUP_PARAMS = "minmax"
SEARCH_FACTORS = (0.85, 1.0, 1.15, 1.3)  # factors on each end of the MinMax range (4 x 4 = 16 candidates)


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
                 error_feedback: str = "weighted"):
        check_slicing(mode)
        if error_feedback not in ERROR_FEEDBACK:
            raise ValueError(f"error feedback must be one of {', '.join(ERROR_FEEDBACK)}, got {error_feedback!r}")
        self.c = master_bits
        self.bits, self.lam = resolve_bits_lambdas(master_bits, bits, lambdas)
        self.mode = mode
        S, A, B = _tables(self.c, self.bits, self.lam, mode)
        self._brk, self._codes = envelope(self.c, self.bits, self.lam, mode)
        self._index = BucketIndex(self._brk)
        self._S, self._A, self._B = S, A, B
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
            self._A_d, self._B_d = self._A.to(device), self._B.to(device)
            self._S_d = self._S.float().to(device)
            self._dev = device

    def codes(self, u: torch.Tensor) -> torch.Tensor:
        """argmin over all 2^c codes of Σ_r λ_r (u − S_r(q))² (u in master code units), via the envelope."""
        self._on(u.device)
        return _take(self._codes_d, self._index_d(u))

    def codes_bruteforce(self, u: torch.Tensor) -> torch.Tensor:
        """Exhaustive reference: evaluates every code ([..., 2^c] memory)."""
        self._on(u.device)
        f = self._B_d - 2 * u.unsqueeze(-1).double() * self._A_d
        return f.argmin(-1)

    def objective(self, u: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Σ_r λ_r (u − S_r(q))² in code units (multiply by α² for weight units)."""
        self._on(u.device)
        return sum(lam * (u - S[q]) ** 2 for lam, S in zip(self.lam, self._S_d))

    def round(self, w, scale, zero):
        u = w / scale + zero
        q = self.codes(u)
        return q, scale * (_take(self._fb_d, q) - zero)


def search_params_fn(rounder: MultiSliceRounder, symmetric: bool, param_dtype, factors=SEARCH_FACTORS):
    """Per-row (α, z) of a group minimising the λ-weighted multi-slice error of its nearest codes."""
    half = 2 ** (rounder.c - 1)

    def fn(wg: torch.Tensor, g: int = 0):
        f = torch.tensor(factors, device=wg.device, dtype=torch.float32)
        if symmetric:
            amax = wg.abs().amax(1, keepdim=True)  # [out, 1]
            s = symmetric_scale(amax * f, rounder.c, param_dtype)  # [out, K]
            z = torch.full_like(s, float(half))
        else:
            lo, hi = wg.amin(1, keepdim=True), wg.amax(1, keepdim=True)  # [out, 1]
            mid, rad = (lo + hi) / 2, (hi - lo) / 2
            lo = (mid - rad * f)[:, :, None]  # [out, K, 1]: each end moved away from / towards the mid-point
            hi = (mid + rad * f)[:, None, :]  # [out, 1, K]
            s, z = affine_params(lo, hi, rounder.c, param_dtype)  # [out, K, K], floored for param_dtype
            s, z = s.reshape(wg.shape[0], -1), z.reshape(wg.shape[0], -1)
        s, z = s.to(param_dtype).float(), z.to(param_dtype).float()
        u = wg[:, None, :] / s[:, :, None] + z[:, :, None]  # [out, K, g]
        q = rounder.codes(u)
        err = (rounder.objective(u, q) * (s * s)[:, :, None]).sum(-1).nan_to_num(float('inf'))  # [out, K]
        k = err.argmin(1, keepdim=True)
        return s.gather(1, k)[:, 0], z.gather(1, k)[:, 0]
    return fn


def matgptq_quantize_weight(W, H, rounder: MultiSliceRounder, group_size: int, symmetric: bool = False,
                            param_dtype=torch.float16, percdamp: float = 0.01, act_order: bool = False,
                            group_params: str = "minmax", blocksize: int = DEFAULT_BLOCKSIZE, name: str = "layer",
                            clip: str = DEFAULT_CLIP, refit: bool = False, clip_lambdas=None):
    from matquant.algorithms.gptq import group_params_fn

    check_group_params(group_params, clip)
    gs = resolve_group_size(W.shape[1], group_size)
    pfn = (search_params_fn(rounder, symmetric, param_dtype) if group_params == "search"
           else group_params_fn(clip, H, rounder.c, symmetric, param_dtype, rounder.mode, rounder.bits,
                                rounder.lam if clip_lambdas is None else tuple(clip_lambdas), rounder.codes))
    codes, s, z, loss = gptq_columns(W, H, group_size=gs, params_fn=pfn, round_fn=rounder.round, percdamp=percdamp,
                                     act_order=act_order, blocksize=blocksize, name=name)
    if refit:  # (α, z) re-solved for the chosen codes against every slice's output error (quant/refit.py)
        s, z, _ = refit_params(W, H, codes, s, z, master_bits=rounder.c, group_size=gs, slicing=rounder.mode,
                               bits=rounder.bits, lambdas=rounder.lam, symmetric=symmetric, param_dtype=param_dtype)
    return QuantizedWeight(codes=codes, scales=s.to(param_dtype), zeros=z.to(param_dtype), bits=rounder.c,
                           group_size=gs), loss


def matgptq(model, targets: list[str], *, master_bits: int, group_size: int, symmetric: bool, param_dtype,
            slicing: str = DEFAULT_SLICING, calib=None, progress: bool = True, bits_list=None, lambdas=None,
            error_feedback: str = DEFAULT_ERROR_FEEDBACK, group_params: str = DEFAULT_GROUP_PARAMS, damp: float = 0.01,
            act_order: bool = False, blocksize: int = DEFAULT_BLOCKSIZE, true_sequential: bool = True, device=None,
            batch_size: int = 1, propagate="master", clip: str = DEFAULT_CLIP,
            refit: bool = False, clip_lambdas=None,
            slice_params: str = DEFAULT_SLICE_PARAMS) -> dict[str, QuantizedWeight]:
    """Multi-precision GPTQ: int-`master_bits` codes good for every precision in `bits_list` under `slicing`.

    `clip`: group (α, z) by MinMax ('minmax', default), or by the clipping search of quant/clip_search.py for the
    same R, λ and multi-slice code choice, with h = 1 ('mse') or h = diag(H) ('weighted'); `clip_lambdas` replaces
    λ in that search only (one weight per slice of R; the code choice keeps `lambdas`). `refit`: after the column
    loop, re-solve each row's (α, z) for its codes by least squares on Σ_r λ_r ‖(W − Ŵ_r)X‖² (quant/refit.py).
    `slice_params`: 'own' also fits every served slice below the master its own (α_r, z_r) for the same codes, on
    that slice's output error alone (algorithms/slice_params.py).

    `propagate` is what the next layers and blocks see while the pass runs: "master" (the int-c weights, default),
    an int r (the r-bit slice, e.g. 4), or "fp" (the full-precision weights: every layer is calibrated on fp inputs).
    """
    rounder = MultiSliceRounder(master_bits, bits_list, lambdas, slicing, error_feedback)
    check_group_params(group_params, clip)
    check_clip_lambdas(clip_lambdas, clip, master_bits, rounder.bits)
    prop = propagate_fn(propagate, master_bits, slicing)
    check_slice_params(slice_params)

    def q(name, W, H):
        qw, _ = matgptq_quantize_weight(W, H, rounder, group_size, symmetric, param_dtype, damp, act_order,
                                        group_params, blocksize, name, clip, refit, clip_lambdas)
        return with_slice_params(qw, W, H, slice_params, slicing, symmetric, param_dtype)

    return blockwise_hessian_method(model, targets, calib, q, true_sequential=true_sequential, device=device,
                                    batch_size=batch_size, progress=progress, propagate=prop,
                                    desc=f"MatGPTQ int{master_bits} {'/'.join(map(str, rounder.bits))}")


def check_group_params(group_params: str, clip: str) -> None:
    if group_params not in GROUP_PARAMS:
        raise ValueError(f"group params must be one of {', '.join(GROUP_PARAMS)}, got {group_params!r}")
    check_clip(clip)
    if group_params == "search" and clip != "minmax":
        raise ValueError(f"--group-params search and --clip {clip} both choose the group (α, z); give one of them "
                         "(--clip is the finer, importance-weighted search).")


def propagate_fn(propagate, master_bits: int, slicing: str):
    """The `propagate` option of matgptq as a function (qw, W) -> weight for the rest of the pass (None: master)."""
    if propagate in ("master", None) or (str(propagate).isdigit() and int(propagate) == master_bits):
        return None
    if propagate == "fp":
        return lambda qw, W: W
    if str(propagate).isdigit() and 1 <= int(propagate) < master_bits:
        r = int(propagate)
        from matquant.quant import dequantize
        return lambda qw, W: dequantize(qw, r, slicing)
    raise ValueError(f"propagate must be 'master', 'fp' or a slice precision 1..{master_bits}, got {propagate!r}.")
