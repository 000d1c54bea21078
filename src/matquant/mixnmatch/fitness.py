"""Search fitness: KL divergence of the sliced model's next-token distribution from the fp32 model's.

The fp32 reference is run once over the calibration windows and only its top-k log-probabilities (and their
token ids) are kept, so the reference fits on disk (k=128: 1 KiB per token) and the reference model can be freed.
KL is computed on the top-k tokens plus one "tail" bucket holding the rest of the probability mass on both sides:

    KL_k(p‖q) = Σ_{i∈top-k(p)} p_i (log p_i − log q_i) + p_tail (log p_tail − log q_tail)

— the exact KL of the two distributions coarsened to k+1 outcomes, hence a lower bound of the full KL that is
tight when p's tail is small. Calibration text only ('calib' or a user file), never the evaluation text.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm


@dataclass
class ReferenceTopK:
    windows: torch.Tensor  # int64 [n, L] token ids
    logp: torch.Tensor  # float32 [n, L, k] reference log-probs of its top-k tokens, descending
    idx: torch.Tensor  # int64 [n, L, k] their token ids
    meta: dict

    def save(self, path) -> None:
        from safetensors.torch import save

        from matquant.format.atomic import atomic_write_bytes

        tensors = {"windows": self.windows.to(torch.int32).contiguous(), "logp": self.logp.contiguous(),
                   "idx": self.idx.to(torch.int32).contiguous()}
        atomic_write_bytes(path, save(tensors, metadata={k: str(v) for k, v in self.meta.items()}))

    @classmethod
    def load(cls, path) -> "ReferenceTopK":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            t = {k: f.get_tensor(k) for k in ("windows", "logp", "idx")}
        return cls(t["windows"].long(), t["logp"].float(), t["idx"].long(), meta)


@torch.inference_mode()
def compute_reference(model, windows: torch.Tensor, k: int = 128, meta: dict | None = None,
                      progress: bool = True) -> ReferenceTopK:
    """Top-k next-token log-probs of `model` (the fp32 reference) at every position of every window."""
    if k < 1:
        raise ValueError(f"top-k must be >= 1, got {k}")
    device = next(model.parameters()).device
    lps, ids = [], []
    for i in tqdm(range(windows.shape[0]), desc="fp32 reference", disable=not progress, unit="win", leave=False):
        logits = model(input_ids=windows[i: i + 1].to(device), use_cache=False).logits[0].float()
        top = torch.log_softmax(logits, -1).topk(min(k, logits.shape[-1]), dim=-1)
        lps.append(top.values.cpu())
        ids.append(top.indices.cpu())
    return ReferenceTopK(windows.clone(), torch.stack(lps), torch.stack(ids), dict(meta or {}, k=k))


def load_or_compute_reference(path, windows: torch.Tensor, k: int, meta: dict, load_reference,
                              progress: bool = True) -> tuple[ReferenceTopK, bool]:
    """Reuse the cached reference at `path` when it matches (same windows, k and metadata), else compute and save.

    `load_reference()` returns the fp32 model; it is only called on a cache miss. Returns (reference, was_cached).
    """
    meta = {k_: str(v) for k_, v in dict(meta, k=k).items()}
    if path is not None and Path(path).exists():
        try:
            ref = ReferenceTopK.load(path)
            if ref.meta == meta and ref.windows.shape == windows.shape and torch.equal(ref.windows, windows):
                return ref, True
        except Exception:  # unreadable cache: recompute
            pass
    ref = compute_reference(load_reference(), windows, k, meta, progress)  # the fp32 model is freed on return
    if path is not None:
        ref.save(path)
    return ref, False


def topk_kl(logits: torch.Tensor, ref_logp: torch.Tensor, ref_idx: torch.Tensor) -> torch.Tensor:
    """Per-position KL_k(p‖q) [L] from candidate logits [L, V] and the reference's top-k [L, k]."""
    logq = torch.log_softmax(logits.float(), -1)
    q_top = logq.gather(-1, ref_idx)
    p = ref_logp.exp()
    kl = (p * (ref_logp - q_top)).sum(-1)
    p_tail = (1 - p.sum(-1)).clamp_min(0)
    q_tail = (1 - q_top.exp().sum(-1)).clamp_min(1e-12)
    tail = torch.where(p_tail > 0, p_tail * (p_tail.clamp_min(1e-12).log() - q_tail.log()), torch.zeros_like(p_tail))
    return kl + tail


class KLFitness:
    """Mean per-token KL of the model's *current* precision vs the reference, on chosen calibration windows."""

    def __init__(self, model, ref: ReferenceTopK):
        self.model, self.ref = model, ref
        self.device = next(model.parameters()).device
        self.tokens_seen = 0

    @property
    def n_windows(self) -> int:
        return self.ref.windows.shape[0]

    @torch.inference_mode()
    def __call__(self, window_ids) -> float:
        total, count = 0.0, 0
        for i in window_ids:
            x = self.ref.windows[i: i + 1].to(self.device)
            logits = self.model(input_ids=x, use_cache=False).logits[0]
            kl = topk_kl(logits, self.ref.logp[i].to(self.device), self.ref.idx[i].to(self.device))
            if not torch.isfinite(kl).all():
                raise FloatingPointError("non-finite KL: the sliced model produces NaN/Inf logits.")
            total += kl.sum().item()
            count += kl.numel()
        self.tokens_seen += count
        return total / max(count, 1)
