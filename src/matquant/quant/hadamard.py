"""Hadamard matrices of the sizes LLMs use, and their fast application (pure math, no model code).

A Hadamard matrix H_n (entries ±1, H·Hᵀ = n·I) exists for n = 1, 2 and multiples of 4. We construct:

- Sylvester's H_{2^k} (applied with the fast Walsh-Hadamard butterfly, O(n log n));
- Paley I  (prime q ≡ 3 mod 4): order q + 1   (12, 20, 24, 32, 44, 48, 60, 68, 72, 80, 84, ...);
- Paley II (prime q ≡ 1 mod 4): order 2(q + 1) (12, 28, 36, 60, 76, 108, ...);
- Kronecker products of the above, e.g. 576 = 12·12·4, 1536 = 12·128, 896 = 28·32, 4864 = 76·64,
  14336 = 28·512.

`hadamard_factors(n)` picks a factorisation of n into such factors (the smallest dense factors first), and
`apply_hadamard(x, factors)` multiplies the last dimension of x by H_n/√n without forming the n×n matrix: each
factor acts along its own axis of x reshaped to [..., f1, f2, ..., 2^k]. Sizes with no construction here (e.g.
11008 = 256·43) raise a clear error; use a block-diagonal (per-group) transform for those.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = χ(j − i) with χ the quadratic character mod the prime q (χ(0) = 0)."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = torch.tensor([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=torch.float64)
    idx = (torch.arange(q).unsqueeze(0) - torch.arange(q).unsqueeze(1)) % q
    return chi[idx]


def _paley1(q: int) -> torch.Tensor:
    n = q + 1
    s = torch.zeros(n, n, dtype=torch.float64)
    s[0, 1:] = 1
    s[1:, 0] = -1
    s[1:, 1:] = _jacobsthal(q)
    return s + torch.eye(n, dtype=torch.float64)


def _paley2(q: int) -> torch.Tensor:
    n = q + 1
    c = torch.zeros(n, n, dtype=torch.float64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = _jacobsthal(q)
    a = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(n, dtype=torch.float64), b)


@lru_cache(maxsize=None)
def _paley(n: int) -> torch.Tensor | None:
    """A Paley Hadamard matrix of order n (not a power of two), or None."""
    if n % 4:
        return None
    if _is_prime(n - 1) and (n - 1) % 4 == 3:
        return _paley1(n - 1)
    if n % 2 == 0 and _is_prime(n // 2 - 1) and (n // 2 - 1) % 4 == 1:
        return _paley2(n // 2 - 1)
    return None


@lru_cache(maxsize=None)
def hadamard_factors(n: int) -> tuple[int, ...]:
    """Factor orders (Paley orders first, one power of two last) whose Kronecker product is a Hadamard H_n."""
    if n < 1:
        raise ValueError(f"a Hadamard transform needs a positive size, got {n}")
    pow2 = n & -n
    rest = n // pow2
    if rest == 1:
        return (n,)
    # rest is odd: find Paley orders m1·m2·... = rest·2^j with 2^j | pow2 (each Paley order is a multiple of 4)
    best = _split(rest, pow2)
    if best is None:
        raise ValueError(
            f"no Hadamard construction of size {n} (= {pow2}·{rest}) is built in; use a block-diagonal "
            "transform per group (e.g. rotate='input-block'), whose size is the group size.")
    factors, used_pow2 = best
    return tuple(factors) + ((pow2 // used_pow2,) if pow2 // used_pow2 > 1 else ())


MAX_DENSE_FACTOR = 256  # larger Paley factors exist for some sizes but cost a dense m×m multiply per vector


def _split(odd: int, pow2: int) -> tuple[list[int], int] | None:
    """Smallest-first Paley factors covering the odd part `odd`, using at most `pow2` of the power of two."""
    if odd == 1:
        return [], 1
    j = 4
    while j <= pow2 and j * 3 <= MAX_DENSE_FACTOR:
        for d in sorted(d for d in range(3, odd + 1, 2) if odd % d == 0):
            m = d * j
            if m <= MAX_DENSE_FACTOR and _paley(m) is not None:
                sub = _split(odd // d, pow2 // j)
                if sub is not None:
                    return [m] + sub[0], j * sub[1]
        j *= 2
    return None


def _dense_factor(m: int) -> torch.Tensor:
    h = _paley(m)
    assert h is not None
    return h


@lru_cache(maxsize=None)
def _sylvester(n: int) -> torch.Tensor:
    """Sylvester's ±1 matrix H_n (float64) for n a power of two."""
    s = torch.ones(1, 1, dtype=torch.float64)
    while s.shape[0] < n:
        s = torch.cat([torch.cat([s, s], 1), torch.cat([s, -s], 1)], 0)
    return s


def kron_factors(factors) -> torch.Tensor:
    """The ±1 Kronecker product (float64) of the Hadamard matrices of `factors` (Sylvester or Paley orders)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    for f in factors:
        h = torch.kron(h, _sylvester(f) if _is_pow2(f) else _dense_factor(f))
    return h


def hadamard_matrix(n: int) -> torch.Tensor:
    """The ±1 matrix H_n (float64) of `hadamard_factors(n)`; H·Hᵀ = n·I exactly. For tests and small n."""
    return kron_factors(hadamard_factors(n))


def _fwht_last(x: torch.Tensor) -> torch.Tensor:
    """Unnormalised fast Walsh-Hadamard transform along the last dim (a power of two)."""
    n = x.shape[-1]
    lead = x.shape[:-1]
    h = 1
    while h < n:
        x = x.reshape(*lead, n // (2 * h), 2, h)
        a, b = x[..., 0, :], x[..., 1, :]
        x = torch.stack((a + b, a - b), dim=-2)
        h *= 2
    return x.reshape(*lead, n)


def apply_hadamard(x: torch.Tensor, factors: tuple[int, ...] | None = None, transpose: bool = False) -> torch.Tensor:
    """x · (H_n/√n)ᵀ along the last dim (transpose=True: x · H_n/√n), without forming H_n."""
    n = x.shape[-1]
    factors = factors or hadamard_factors(n)
    if math.prod(factors) != n:
        raise ValueError(f"Hadamard factors {factors} do not multiply to the last dimension {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, *factors)
    for axis, f in enumerate(factors, start=1):
        if _is_pow2(f):
            y = _fwht_last(y.movedim(axis, -1)).movedim(-1, axis)  # Sylvester matrices are symmetric
        else:
            h = _dense_factor(f).to(dtype=x.dtype, device=x.device)
            y = torch.tensordot(y, h.t() if transpose else h, dims=([axis], [1])).movedim(-1, axis)
    return (y * (1.0 / math.sqrt(n))).reshape(*lead, n)


def random_signs(n: int, seed: int) -> torch.Tensor:
    """±1 vector of length n from a seed (the 'randomized' part of a randomized Hadamard transform)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).mul(2).sub(1).to(torch.float32)
