"""Least-squares refit of the group parameters (α, z) for FIXED codes, against the layer's output error: the one
refit behind `refit` (GPTQ/MatGPTQ: the shared (α, z) for every served slice at once) and `slice_params='own'`
(each slice's own (α_r, z_r), `separate=True`).

After GPTQ/MatGPTQ has chosen every code (with α, z fixed when its column loop reached each group), the group
parameters are no longer the best ones for those codes: the error feedback moved the weights the codes stand for.
With the codes q fixed, every slice's dequantized weight is linear in (α, t = α·z) of each group,

    ŵ_r = α·S_r(q) − t          (S_r: the slicing mode's value in master units, `quant.slicing.slice_master`)

so the multi-slice output error of one row w (H = XᵀX of the layer's calibration inputs)

    E(p) = Σ_r λ_r (w − ŵ_r) H (w − ŵ_r)ᵀ,     p = (α_1, t_1, …, α_G, t_G)

is a quadratic in p with a 2G × 2G matrix per row, solved exactly (Levenberg-damped toward the current values, so
a group whose codes are all equal keeps its parameters). The solution is rounded to the storage dtype and a row
keeps it only when its error E, evaluated with the rounded values, is strictly smaller than before: the refit is
never worse than the parameters it starts from on this objective. Symmetric quantization keeps z at its fixed
mid-point and refits α alone. Cost per row and slice: one [G·g] × [G·g] product per group block, i.e. about
rows · in² multiply-adds per slice (a fraction of GPTQ's own cost for the layer).
"""
from __future__ import annotations

import torch

from matquant.quant.minmax import param_limits
from matquant.quant.slicing import slice_master

DAMP = 1e-6  # Levenberg damping, relative to each diagonal entry of the row's system
DAMP_TRIES = 4  # damping ×100 per retry for the rows whose system is not numerically positive definite
SYSTEM_BYTES = 1 << 29  # work memory of one batch of rows: the [n, G, in] product of slice_system dominates


def rows_per_batch(n_groups: int, in_features: int, budget: int = SYSTEM_BYTES) -> int:
    """How many rows' systems to build at once: the float64 [n, G, in] product in `slice_system` and the
    [n, 2G, 2G] system (with its factor) within `budget` bytes (a 4096-row × 11008-input layer at G = 172 would
    otherwise hold several GB per batch)."""
    per_row = 8 * (n_groups * in_features + 3 * (2 * n_groups) ** 2)
    return max(1, min(256, budget // per_row))


def solve_damped(K: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """x [n, m] solving (K + D)x = rhs per row for symmetric positive semi-definite K [n, m, m] and rhs [n, m],
    D = DAMP·diag(K) (Levenberg damping, plus a tiny floor so an all-zero row/column is solvable).

    By Cholesky, not LU: K is a Gram matrix, and torch 2.13's batched LU solve on CPU fails outright after
    `torch.set_num_threads(n)` ("Pivots given to lu_solve must all be greater or equal to 1", measured in
    docs/benchmarks.md). A row whose factorisation fails gets ×100 the damping, up to DAMP_TRIES times; a row
    that still fails gets x = 0 (callers treat x as a step from their current values, so that row keeps them)."""
    diag = torch.diagonal(K, dim1=1, dim2=2).clamp_min(0)
    x = torch.zeros_like(rhs)
    todo = torch.arange(K.shape[0], device=K.device)
    damp = DAMP
    for _ in range(DAMP_TRIES + 1):
        A = K[todo] + torch.diag_embed(damp * diag[todo] + 1e-30)
        L, info = torch.linalg.cholesky_ex(A)
        good = info == 0
        if good.any():
            x[todo[good]] = torch.cholesky_solve(rhs[todo[good]].unsqueeze(2), L[good])[:, :, 0]
        todo = todo[~good]
        if todo.numel() == 0:
            break
        damp *= 100
    return torch.where(torch.isfinite(x), x, torch.zeros_like(x))


def hessian_blocks(H: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Hb [G, gs, in]: H's rows by group, T [G, G]: Σ_{i∈g, j∈h} H_ij) in float64, what `slice_system` reads."""
    in_f = H.shape[0]
    G = in_f // group_size
    H = H.double()  # (a column never seen in calibration has a zero row and column: it adds nothing)
    return H.view(G, group_size, in_f), H.view(G, group_size, G, group_size).sum((1, 3))


def slice_system(q: torch.Tensor, Hb: torch.Tensor, Hw: torch.Tensor, T: torch.Tensor, *, master_bits: int, slices,
                 lambdas, slicing: str):
    """The blocks of each row's quadratic E(α, t) = Σ_r λ_r (w − ŵ_r) H (w − ŵ_r)ᵀ (up to a constant), ŵ_r =
    α·S_r(q) − t per group, for codes q [n, in] and Hw = w·H [n, in] of the same rows (float64):
    (Kaa, Kat [n, G, G], ba, bt [n, G], Ktt [n, G, G]) with E = pᵀKp − 2pᵀb, p = (α, t),
    K = [[Kaa, Kat], [Katᵀ, Ktt]], b = (ba, bt)."""
    n = q.shape[0]
    G, gs = Hb.shape[0], Hb.shape[1]
    Kaa = torch.zeros(n, G, G, dtype=torch.float64)
    Kat = torch.zeros(n, G, G, dtype=torch.float64)
    ba = torch.zeros(n, G, dtype=torch.float64)
    for r, lr in zip(slices, lambdas):
        if lr == 0:
            continue
        v = slice_master(q, master_bits, r, slicing).double().view(n, G, gs)  # [n, G, gs]
        Y = torch.einsum("rgk,gkj->rgj", v, Hb).view(n, G, G, gs)  # Σ_{i∈g} v_i H_ij, columns j by group h
        Kaa += lr * torch.einsum("rghk,rhk->rgh", Y, v)  # (faster than the product-and-sum on CPU)
        Kat -= lr * Y.sum(-1)
        ba += lr * (v * Hw.view(n, G, gs)).sum(-1)
    L = sum(lambdas)
    bt = -L * Hw.view(n, G, gs).sum(-1)
    Ktt = (L * T).expand(n, G, G)
    return Kaa, Kat, ba, bt, Ktt


def fixed_zero_system(Kaa, Kat, ba, bt, Ktt, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K [n, G, G], b [n, G]) of E as a quadratic in α alone for fixed zeros z [n, G] (E = αᵀKα − 2αᵀb + const).

    z fixed: ŵ_r = α(S_r − z) = α·S_r − α·z, so with Kat[g, h] = −Σ_{i∈g, j∈h} S_i H_ij the α-α system is
    Kaa + Kat·z_h + z_g·Katᵀ + z_g z_h Ktt, and its right-hand side ba + z·bt."""
    K = Kaa + Kat * z.unsqueeze(1) + z.unsqueeze(2) * Kat.transpose(1, 2) + z.unsqueeze(2) * z.unsqueeze(1) * Ktt
    return K, ba + z * bt


def _error(K: torch.Tensor, b: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """pᵀKp − 2pᵀb per row (E(p) up to a constant of the row)."""
    return (p.unsqueeze(1) @ K @ p.unsqueeze(2))[:, 0, 0] - 2 * (p * b).sum(1)


@torch.no_grad()
def refit_params(W: torch.Tensor, H: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 *, master_bits: int, group_size: int, slicing: str, slices=None, lambdas=None,
                 symmetric: bool = False, param_dtype: torch.dtype = torch.float16, chunk: int | None = None,
                 separate: bool = False):
    """(scales, zeros, fraction of rows changed) minimising Σ_r λ_r ‖(W − Ŵ_r)X‖² over r in `slices` for the given
    codes.

    W [out, in] float weights the codes stand for (the layer's original weights), H [in, in] (any positive multiple
    of XᵀX), codes uint8 [out, in], scales/zeros [out, G] the stored values the codes were chosen with.
    `slices`/`lambdas`: the slices whose error is fitted and their weights (default: the master alone, λ = 1).
    `separate`: fit every slice of `slices` on its own error instead (λ unused) and return {r: (scales, zeros,
    fraction)}; the products with H that do not depend on the slice are computed once.
    `chunk`: rows per batch of systems (default: `rows_per_batch`, memory-bounded).
    """
    out_f, in_f = W.shape
    gs = group_size
    G = in_f // gs
    bits = (master_bits,) if slices is None else tuple(int(r) for r in slices)
    for r in bits:
        if not 1 <= r <= master_bits:
            raise ValueError(f"refit: slice int{r} is not a slice of the int{master_bits} master (1..{master_bits}).")
    lam = (1.0,) * len(bits) if lambdas is None else tuple(float(x) for x in lambdas)
    H = H.double()
    Hb, T = hessian_blocks(H, gs)  # T: the t-t block, the same for every row
    smin, zmax = param_limits(param_dtype)
    problems = [((r,), (1.0,)) for r in bits] if separate else [(bits, lam)]
    new = [[scales.clone(), zeros.clone(), 0] for _ in problems]
    chunk = chunk or rows_per_batch(G, in_f)
    for r0 in range(0, out_f, chunk):
        r1 = min(out_f, r0 + chunk)
        w = W[r0:r1].double()
        Hw = w @ H  # [n, in]
        q = codes[r0:r1]
        s0, z0 = scales[r0:r1].double(), zeros[r0:r1].double()
        for (pbits, plam), acc in zip(problems, new):
            Kaa, Kat, ba, bt, Ktt = slice_system(q, Hb, Hw, T, master_bits=master_bits, slices=pbits,
                                                 lambdas=plam, slicing=slicing)
            if symmetric:
                K, b = fixed_zero_system(Kaa, Kat, ba, bt, Ktt, z0)
                p0 = s0
            else:
                K = torch.cat([torch.cat([Kaa, Kat], 2), torch.cat([Kat.transpose(1, 2), Ktt], 2)], 1)
                b = torch.cat([ba, bt], 1)
                p0 = torch.cat([s0, s0 * z0], 1)
            p = p0 + solve_damped(K, b - (K @ p0.unsqueeze(2))[:, :, 0])
            s1 = p[:, :G].clamp_min(smin).to(param_dtype).double()
            z1 = z0 if symmetric else (p[:, G:] / s1).clamp(-zmax, zmax).to(param_dtype).double()
            p1 = s1 if symmetric else torch.cat([s1, s1 * z1], 1)
            e0 = _error(K, b, p0)
            better = (_error(K, b, p1) < e0 - 1e-12 * e0.abs()) & torch.isfinite(p1).all(1)
            acc[0][r0:r1][better] = s1[better].to(scales.dtype)
            acc[1][r0:r1][better] = z1[better].to(zeros.dtype)
            acc[2] += int(better.sum())
    out = [(s_, z_, c / max(1, out_f)) for s_, z_, c in new]
    return {r: o for (pb, _), o in zip(problems, out) for r in pb} if separate else out[0]

