"""Input-side randomized Hadamard rotations ("incoherence processing"), the same for every slice of the master.

A target linear y = W·x (x a row vector: y = x·Wᵀ) is quantized as W' = W·V with V orthogonal, and run as
y = (x·V)·Ŵ'ᵀ: exact before quantization because V·Vᵀ = I. The master codes, every sliced precision and the
methods are unchanged; only the input of the layer is transformed online, once per forward.

    V = D·Hᵀ/√b, block-diagonal with blocks of size b    (D = diag of seeded random signs over all n inputs)

- mode ``input``: one block, b = n (the layer's in_features): H_n from `quant.hadamard` (576 = 12·12·4,
  1536 = 12·128, ...).
- mode ``block``: b = the checkpoint's group size (e.g. H_64 per group): cheaper online, outliers spread only
  within a group.

V depends only on (seed, n, b): layers that read the same input (q/k/v, gate/up) share one V, so their rotated
input is computed once (`InputRotation` reuses its last result for the same input tensor when no gradient is
recorded, outside torch.inference_mode). A checkpoint stores only the spec, e.g. {"mode": "input", "kind": "hadamard", "seed": 0} or
{"mode": "block", "kind": "hadamard", "seed": 0, "block_size": 64}; V is rebuilt from it at load.

x·V is applied as two dense matmuls: H_b = A ⊗ B (A, B the Kronecker products of the first and last factors of
`hadamard_factors(b)`, split where a + b' is smallest), so x·Hᵀ = A·X·Bᵀ with X the input reshaped [a, b'].
For 1536 that is 48×48 and 32×32 matrices (80 multiply-adds per input, vs 1536·out for the layer itself).
"""
from __future__ import annotations

import math
import weakref
from functools import lru_cache

import torch

from matquant.quant.hadamard import _is_pow2, hadamard_factors, kron_factors, random_signs

ROTATE_MODES = ("none", "input", "block", "residual")  # what quantize_model(rotate=...) and --rotate accept
STORED_MODES = ("input", "block", "residual")
ONLINE_MODES = ("input", "block")  # the modes each quantized layer applies to its input at inference
KINDS = ("hadamard",)
SPEC_KEYS = {"input": ("mode", "kind", "seed"), "block": ("mode", "kind", "seed", "block_size"),
             "residual": ("mode", "kind", "seed")}


class RotationSpecError(ValueError):
    """A rotation spec (argument or checkpoint field) is malformed or unknown to this matquant."""


def make_spec(mode: str, group_size: int, seed: int = 0) -> dict | None:
    """The spec stored in the checkpoint for `rotate=mode` (None for 'none'); `group_size` is the resolved group
    size the block mode uses (-1 / per-channel: the block is the whole row, i.e. mode 'input')."""
    if mode not in ROTATE_MODES:
        raise RotationSpecError(f"unknown rotation {mode!r}; choose one of {', '.join(ROTATE_MODES)} "
                                "(input: randomized Hadamard over the whole input dimension; block: one per group; "
                                "residual: one over the residual stream, folded into the weights).")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise RotationSpecError(f"rotation seed must be a non-negative integer, got {seed!r}.")
    if mode == "none":
        return None
    if mode == "block":
        if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
            raise RotationSpecError(f"rotate='block' needs a positive group size (one Hadamard block per group), got "
                                    f"{group_size!r}; use rotate='input' for per-channel groups.")
        return check_spec({"mode": "block", "kind": "hadamard", "seed": seed, "block_size": group_size})
    return check_spec({"mode": mode, "kind": "hadamard", "seed": seed})


def online_spec(spec: dict | None) -> dict | None:
    """The part of a (checked) spec that quantized layers apply to their input at inference: the spec itself for
    'input' / 'block', None for 'residual' (folded into the model's weights before quantization, nothing online)."""
    spec = check_spec(spec)
    return spec if spec is not None and spec["mode"] in ONLINE_MODES else None


def check_spec(spec) -> dict | None:
    """Validate a stored spec strictly (None = no rotation); returns it. Unknown modes/kinds/keys name the fix."""
    if spec is None:
        return None
    newer = "written by a newer matquant? Upgrade matquant, or re-quantize with --rotate none|input|block|residual."
    if not isinstance(spec, dict):
        raise RotationSpecError(f"rotation must be null or a JSON object, got {type(spec).__name__} {spec!r:.80}.")
    mode = spec.get("mode")
    if mode not in STORED_MODES:
        raise RotationSpecError(f"rotation mode {mode!r:.40} is not known to this matquant (knows "
                                f"{', '.join(STORED_MODES)}); {newer}")
    if spec.get("kind") not in KINDS:
        raise RotationSpecError(f"rotation kind {spec.get('kind')!r:.40} is not known to this matquant (knows "
                                f"{', '.join(KINDS)}); {newer}")
    keys = SPEC_KEYS[mode]
    unknown, missing = sorted(set(spec) - set(keys)), [k for k in keys if k not in spec]
    if unknown:
        raise RotationSpecError(f"rotation has unknown key(s) {unknown}; {newer}")
    if missing:
        raise RotationSpecError(f"rotation (mode {mode!r}) is missing key(s) {missing}.")
    for k in ("seed", "block_size"):
        if k in spec:
            v = spec[k]
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if k == "seed" else 1):
                raise RotationSpecError(f"rotation {k} must be a {'non-negative' if k == 'seed' else 'positive'} "
                                        f"integer, got {v!r:.40}.")
    if mode == "block":
        try:
            hadamard_factors(spec["block_size"])
        except ValueError as e:
            raise RotationSpecError(f"rotation block_size {spec['block_size']}: {e}") from None
    return spec


@lru_cache(maxsize=None)
def two_factor_hadamard(b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B), float64 ±1, with A ⊗ B = `hadamard.hadamard_matrix(b)` and A, B as close in size as the factor order
    allows (the power of two of `hadamard_factors(b)` may be split: H_{2^k} = H_2 ⊗ ... ⊗ H_2)."""
    atoms: list[int] = []
    for f in hadamard_factors(b):
        atoms.extend([2] * int(math.log2(f)) if _is_pow2(f) else [f])
    best = min(range(len(atoms) + 1), key=lambda k: math.prod(atoms[:k]) + math.prod(atoms[k:]))
    return kron_factors(atoms[:best]), kron_factors(atoms[best:])


class InputRotation:
    """x -> x·V along the last dimension (see the module docstring); `inverse`: y -> y·Vᵀ. Not an nn.Module and
    holds no state-dict tensor: it is rebuilt from the spec, and its matrices follow the input's device/dtype."""

    def __init__(self, spec: dict, in_features: int):
        self.spec = check_spec(spec)
        if self.spec is None:
            raise RotationSpecError("InputRotation needs a rotation spec, got None.")
        self.n = in_features
        self.block = in_features if spec["mode"] == "input" else spec["block_size"]
        if in_features % self.block:
            raise RotationSpecError(f"rotation block_size {self.block} does not divide in_features {in_features}.")
        try:
            a, b = two_factor_hadamard(self.block)
        except ValueError as e:
            raise RotationSpecError(f"cannot rotate the input of a layer with {in_features} inputs: {e}") from None
        scale = 1.0 / math.sqrt(self.block)
        self._a64, self._b64 = a * scale, b  # fold 1/√b into A
        self._signs64 = random_signs(in_features, spec["seed"]).double()
        self._mats: dict = {}
        self._last = None  # (weakref to input, its _version, output)

    def _on(self, x: torch.Tensor):
        key = (x.device, x.dtype)
        m = self._mats.get(key)
        if m is None:
            m = self._mats[key] = (self._a64.to(x.device, x.dtype), self._b64.to(x.device, x.dtype),
                                   self._signs64.to(x.device, x.dtype))
        return m

    def _hadamard(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        a, b, _ = self._on(x)
        lead = x.shape[:-1]
        xr = x.reshape(*lead, self.n // self.block, a.shape[0], b.shape[0])
        # x·(A⊗B)ᵀ = A·X·Bᵀ per block; the transpose (x·(A⊗B)) is Aᵀ·X·B
        y = torch.matmul(a.t() if transpose else a, xr)
        y = torch.matmul(y, b if transpose else b.t())
        return y.reshape(*lead, self.n)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x·V. Reuses the previous output when called again on the same, unmodified tensor without autograd."""
        if x.shape[-1] != self.n:
            raise ValueError(f"rotation expects inputs with {self.n} features, got shape {tuple(x.shape)}.")
        last = self._last
        # reuse needs the version counter (an in-place change of x must not reuse a stale result): none under
        # autograd, and inference-mode tensors have none at all
        cacheable = not (torch.is_grad_enabled() and x.requires_grad) and not x.is_inference()
        if cacheable and last is not None and last[0]() is x and last[1] == x._version:
            return last[2]
        low = x.dtype in (torch.float16, torch.bfloat16)
        xf = x.float() if low else x
        y = self._hadamard(xf * self._on(xf)[2], transpose=False)
        y = y.to(x.dtype) if low else y
        self._last = (weakref.ref(x), x._version, y) if cacheable else None
        return y

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """y·Vᵀ (undoes __call__)."""
        low = y.dtype in (torch.float16, torch.bfloat16)
        yf = y.float() if low else y
        x = self._hadamard(yf, transpose=True) * self._on(yf)[2]
        return x.to(y.dtype) if low else x

    def rotate_weight(self, w: torch.Tensor) -> torch.Tensor:
        """W·V for W [out, in] (its rows are rotated like inputs), computed in float64, returned in w's dtype."""
        return self._hadamard(w.double() * self._signs64.to(w.device), transpose=False).to(w.dtype)

    def unrotate_weight(self, w: torch.Tensor) -> torch.Tensor:
        """W'·Vᵀ: the weight in the original input basis (exact dense export of a rotated layer)."""
        return (self._hadamard(w.double(), transpose=True) * self._signs64.to(w.device)).to(w.dtype)

    def __repr__(self) -> str:
        return f"InputRotation({self.spec['mode']}, n={self.n}, block={self.block}, seed={self.spec['seed']})"


@lru_cache(maxsize=256)
def _shared(key: tuple, in_features: int) -> InputRotation:
    return InputRotation(dict(key), in_features)


def input_rotation(spec: dict | None, in_features: int) -> InputRotation | None:
    """The (shared) transform of `spec` for layers with `in_features` inputs; None when spec is None."""
    spec = check_spec(spec)
    if spec is None:
        return None
    return _shared(tuple(sorted(spec.items())), in_features)
