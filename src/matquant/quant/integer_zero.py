"""Integer zero points: group parameters (α, z) of one slice whose zero point lies on that slice's own integer code
grid, fitted for FIXED codes, so that the slice IS an integer-zero-point format's tensor (compressed-tensors / vLLM:
W = scale·(q − zp), zp an integer in the code range).

The r-bit slice of a c-bit master reads its codes as ŵ = α·(S_r(q) − z) with S_r(q) = 2^s·q_r + o (s = c − r;
o = (2^s − 1)/2 for `nested` slicing, 0 for `paper`; `quant.slicing`). With q_r shifted to the signed range
q_r − 2^(r−1), that is scale·(q_signed − zp) with scale = α·2^s and zp = (z − o)/2^s − 2^(r−1). So the slice is an
integer-zero-point tensor exactly when z lies on the grid

    z = o + 2^s·k,   k = 0 … 2^r − 1   (zp = k − 2^(r−1) in the signed r-bit range),

and its scale α·2^s is then exactly representable wherever α is (a power of two apart). For the master (s = 0) the
grid is the integers 0 … 2^c − 1.

`integer_zero_params` moves a free (α, z) onto that grid for the given codes, minimising the slice's calibration
output error E = (w − ŵ) H (w − ŵ)ᵀ per row (H = XᵀX of the layer's inputs; H = None: the plain weight error, every
group on its own), the objective of quant/refit.py. Two starts, the free zeros rounded to the grid and rounded
group after group with each rounding error fed forward (GPTQ's rule on the zero points, `_sequential_round`),
each with α re-solved, its groups' grid points improved by coordinate descent (neighbours, α re-solved) and α
re-solved jointly; per row the best of these and of "the free α with the zero rounded to the grid" is kept: never
worse than rounding, on this objective, with the values as stored (rounded to `param_dtype`). The codes are fixed,
so the zero's rounding offset (up to half a step of the slice, constant over a group) stays; only offsets of
groups whose inputs are correlated can cancel (its cost: docs/export.md).
"""
from __future__ import annotations

import torch

from matquant.quant.minmax import param_limits
from matquant.quant.refit import DAMP, fixed_zero_system, hessian_blocks, rows_per_batch, slice_system, solve_damped
from matquant.quant.slicing import codes_to_master_units, slice_master

# the slice widths an integer-zero engine serves asymmetric: vLLM's compressed-tensors WNA16 kernels take uint4 and
# uint8 codes with a zero point (WNA16_ZP_SUPPORTED_TYPES_MAP in vLLM's compressed_tensors_wNa16.py)
INTEGER_ZERO_BITS = (4, 8)
SWEEPS = 2  # coordinate-descent passes over a row's groups
NEIGHBOURS = (-1, 0, 1)  # grid points tried around a group's current one in each pass
DESCENT_ROWS = 256  # rows per batch of the descent ([rows, 2G, 2G] float64 systems: 242 MB at G = 172)


def zero_grid(master_bits: int, bits: int, mode: str) -> tuple[float, int, int]:
    """(o, step, top): the r-bit slice's integer-zero grid in master units is z = o + step·k, k = 0 … top."""
    o = float(codes_to_master_units(torch.zeros(()), master_bits, bits, mode))
    return o, 2 ** (master_bits - bits), 2**bits - 1


def grid_index(zeros: torch.Tensor, master_bits: int, bits: int, mode: str) -> torch.Tensor:
    """k = (z − o)/step (float64; an integer in 0 … 2^r − 1 where z is on the grid)."""
    o, step, _ = zero_grid(master_bits, bits, mode)
    return (zeros.double() - o) / step


def on_grid(zeros: torch.Tensor, master_bits: int, bits: int, mode: str) -> torch.Tensor:
    """Where z lies exactly on the r-bit slice's integer-zero grid, in range (bool, shape of `zeros`)."""
    k = grid_index(zeros, master_bits, bits, mode)
    return (k == k.round()) & (k >= 0) & (k <= 2**bits - 1)


def snap_to_grid(zeros: torch.Tensor, master_bits: int, bits: int, mode: str) -> torch.Tensor:
    """The nearest grid point of every z (float64), clamped to the code range."""
    o, step, top = zero_grid(master_bits, bits, mode)
    return o + step * grid_index(zeros, master_bits, bits, mode).round().clamp(0, top)


def grid_storable(master_bits: int, bits: int, mode: str, param_dtype: torch.dtype) -> bool:
    """Whether every grid point survives storage in `param_dtype` (float16/float32: always; bfloat16 holds only 8
    significant bits, so e.g. the nested int4 grid 7.5 + 16k of an int8 master is not storable there)."""
    o, step, top = zero_grid(master_bits, bits, mode)
    z = o + step * torch.arange(top + 1, dtype=torch.float64)
    return bool((z.to(param_dtype).double() == z).all())


def _solve_alpha(Kaa, Kat, ba, bt, Ktt, z, alpha, smin):
    """The least-squares α [n, G] for fixed zeros z (damped toward `alpha`, like quant/refit.py), floored at smin."""
    K, b = fixed_zero_system(Kaa, Kat, ba, bt, Ktt, z)
    out = (alpha + solve_damped(K, b - (K @ alpha.unsqueeze(2))[:, :, 0])).clamp_min(smin)
    return torch.where(torch.isfinite(out), out, alpha)


def _energy(K, b, alpha, z):
    """E(p) − const = pᵀKp − 2pᵀb of p = (α, α·z) per row."""
    p = torch.cat([alpha, alpha * z], 1)
    return (p.unsqueeze(1) @ K @ p.unsqueeze(2))[:, 0, 0] - 2 * (p * b).sum(1)


def _descend(K, b, alpha, k, o, step, top, smin):
    """Coordinate descent over the groups of each row: group j moves to the best of its neighbouring grid points
    (NEIGHBOURS) with its α re-solved for the others fixed; returns (α, k)."""
    n, G = alpha.shape
    p = torch.cat([alpha, alpha * (o + step * k)], 1)
    grad = (K @ p.unsqueeze(2))[:, :, 0] - b  # ½ ∂E/∂p
    rows = torch.arange(n, device=alpha.device)
    dk = torch.tensor(NEIGHBOURS, dtype=torch.float64, device=alpha.device)
    for _ in range(SWEEPS):
        for j in range(G):
            idx = [j, G + j]
            Kjj = K[:, idx][:, :, idx]  # [n, 2, 2]
            pj, gj = p[:, idx], grad[:, idx]
            kc = (k[:, j:j + 1] + dk).clamp(0, top)  # [n, C]
            u = torch.stack([torch.ones_like(kc), o + step * kc], -1)  # [n, C, 2]: (α, t) = α·u
            Ku = torch.einsum("nab,ncb->nca", Kjj, u)
            uKu = (u * Ku).sum(-1)
            a = (((Ku * pj.unsqueeze(1)).sum(-1) - (u * gj.unsqueeze(1)).sum(-1)) / uKu.clamp_min(1e-300))
            a = a.clamp_min(smin)
            d = a.unsqueeze(-1) * u - pj.unsqueeze(1)  # [n, C, 2]
            dE = (d * torch.einsum("nab,ncb->nca", Kjj, d)).sum(-1) + 2 * (d * gj.unsqueeze(1)).sum(-1)
            dE = torch.where(torch.isfinite(dE), dE, torch.full_like(dE, float("inf")))
            best = dE.argmin(1)
            take = dE[rows, best] < 0
            dbest = torch.where(take.unsqueeze(1), d[rows, best], torch.zeros_like(pj))
            p[:, idx] += dbest
            grad += (K[:, :, idx] @ dbest.unsqueeze(2))[:, :, 0]
            k[:, j] = torch.where(take, kc[rows, best], k[:, j])
    return p[:, :G], k


def _sequential_round(T, alpha, zeros, o, step, top):
    """Grid indices k [n, G] by rounding the groups' offsets t = α·z one group after another, each rounding error
    fed forward to the groups not yet rounded through the inverse of T (the t-t block Σ_{i∈g, j∈h} H_ij, the same
    for every row): GPTQ's rule, applied to the zero points with α fixed, so that offsets can cancel in the output
    where the inputs of different groups are correlated."""
    G = T.shape[0]
    Td = T + torch.diag(DAMP * torch.diagonal(T).clamp_min(0) + 1e-30)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(Td)), upper=True)
    t = alpha * zeros
    k = torch.empty_like(t)
    for g in range(G):
        k[:, g] = ((t[:, g] / alpha[:, g] - o) / step).round().clamp(0, top)
        err = (t[:, g] - alpha[:, g] * (o + step * k[:, g])) / U[g, g]
        t[:, g + 1:] -= err.unsqueeze(1) * U[g, g + 1:].unsqueeze(0)
    return k


def _independent_groups(W, codes, alpha0, zeros0, master_bits, bits, group_size, slicing, param_dtype):
    """H = None: every group on its own (plain weight error): the best of the two grid points around the free zero
    (α by least squares for each) and the free α with the zero rounded."""
    out_f, in_f = W.shape
    G = in_f // group_size
    o, step, top = zero_grid(master_bits, bits, slicing)
    smin, _ = param_limits(param_dtype)
    v = slice_master(codes, master_bits, bits, slicing).double().view(out_f, G, group_size)
    w = W.double().view(out_f, G, group_size)
    k0 = grid_index(zeros0, master_bits, bits, slicing)
    a0 = alpha0.double().to(param_dtype).double()
    best_a, best_z = a0, o + step * k0.round().clamp(0, top)
    best_e = ((w - a0.unsqueeze(-1) * (v - best_z.unsqueeze(-1))) ** 2).sum(-1)
    for kc in (k0.floor(), k0.ceil()):
        z = o + step * kc.clamp(0, top)
        c = v - z.unsqueeze(-1)
        a = ((w * c).sum(-1) / (c * c).sum(-1).clamp_min(1e-300)).clamp_min(smin).to(param_dtype).double()
        e = ((w - a.unsqueeze(-1) * c) ** 2).sum(-1)
        better = e < best_e
        best_e, best_a, best_z = torch.where(better, e, best_e), torch.where(better, a, best_a), \
            torch.where(better, z, best_z)
    return best_a, best_z


@torch.no_grad()
def integer_zero_params(W: torch.Tensor, H: torch.Tensor | None, codes: torch.Tensor, scales: torch.Tensor,
                        zeros: torch.Tensor, *, master_bits: int, bits: int, group_size: int, slicing: str,
                        param_dtype: torch.dtype = torch.float16, chunk: int | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(scales, zeros) of the `bits`-bit slice with every zero on its integer-zero grid (`zero_grid`), for the given
    master codes; same shapes and dtypes as `scales`/`zeros`, values storable in `param_dtype`.

    W [out, in]: the weights the codes stand for; H [in, in]: a positive multiple of XᵀX of the layer's inputs, or
    None for the plain weight error; scales/zeros [out, G]: the slice's free (α, z), the starting point. Per row the
    result is never worse on E than the free α with the zero rounded to the grid (module docstring)."""
    if not grid_storable(master_bits, bits, slicing, param_dtype):
        o, step, _ = zero_grid(master_bits, bits, slicing)
        raise ValueError(f"the int{bits} slice's integer zero points (grid {o} + {step}k) "
                         f"are not storable in {str(param_dtype).split('.')[-1]}; store the parameters as float16 or "
                         "float32 (--param-dtype), or use --zero-points free.")
    out_f, in_f = W.shape
    G = in_f // group_size
    if H is None:
        a, z = _independent_groups(W, codes, scales, zeros, master_bits, bits, group_size, slicing, param_dtype)
        return a.to(scales.dtype), z.to(zeros.dtype)
    o, step, top = zero_grid(master_bits, bits, slicing)
    smin, _ = param_limits(param_dtype)
    H = H.double()
    Hb, T = hessian_blocks(H, group_size)
    # the systems are built a few rows at a time (their [rows, G, in] product is the memory bound) and solved and
    # descended in batches of up to DESCENT_ROWS rows (the descent's loop over groups costs per batch, not per row)
    build = chunk or rows_per_batch(G, in_f)
    chunk = chunk or max(build, min(DESCENT_ROWS, out_f))
    new_s, new_z = scales.clone(), zeros.clone()
    for r0 in range(0, out_f, chunk):
        r1 = min(out_f, r0 + chunk)
        parts = [slice_system(codes[i:min(r1, i + build)], Hb, W[i:min(r1, i + build)].double() @ H, T,
                              master_bits=master_bits, slices=(bits,), lambdas=(1.0,), slicing=slicing)
                 for i in range(r0, r1, build)]
        Kaa, Kat, ba, bt = (torch.cat([p_[j] for p_ in parts]) for j in range(4))
        Ktt = parts[0][4][:1].expand(r1 - r0, G, G)
        del parts
        K = torch.cat([torch.cat([Kaa, Kat], 2), torch.cat([Kat.transpose(1, 2), Ktt], 2)], 1)
        b = torch.cat([ba, bt], 1)
        a_free = scales[r0:r1].double().to(param_dtype).double()
        k = grid_index(zeros[r0:r1], master_bits, bits, slicing).round().clamp(0, top)
        # the floor every result is compared with: the free α, the zero rounded to the grid
        cands = [(a_free, o + step * k)]
        # two starts: the rounded zeros, and the zeros rounded group after group with the error fed forward
        for k0 in (k, _sequential_round(T, a_free, zeros[r0:r1].double(), o, step, top)):
            a = _solve_alpha(Kaa, Kat, ba, bt, Ktt, o + step * k0, a_free, smin)
            a, k1 = _descend(K, b, a, k0.clone(), o, step, top, smin)
            z = o + step * k1
            cands.append((a.to(param_dtype).double(), z))
            a = _solve_alpha(Kaa, Kat, ba, bt, Ktt, z, a, smin)
            cands.append((a.to(param_dtype).double(), z))
        best_a, best_z = cands[0]
        best_e = _energy(K, b, best_a, best_z)
        for ca, cz in cands[1:]:
            e = _energy(K, b, ca, cz)
            better = (e < best_e) & torch.isfinite(ca).all(1)
            best_e = torch.where(better, e, best_e)
            best_a = torch.where(better.unsqueeze(1), ca, best_a)
            best_z = torch.where(better.unsqueeze(1), cz, best_z)
        new_s[r0:r1] = best_a.to(scales.dtype)
        new_z[r0:r1] = best_z.to(zeros.dtype)
    return new_s, new_z
