"""Perplexity in the GPTQ-paper protocol: non-overlapping windows of the tokenized text, exp(mean NLL)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int  # predicted tokens (windows × (seqlen − 1))
    windows: int
    seqlen: int

    def to_dict(self):
        return asdict(self)


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1, desc: str = "perplexity",
               progress: bool = True) -> PerplexityResult:
    """exp(mean next-token NLL) over `windows` [n, seqlen]; each window is scored independently."""
    device = next(model.parameters()).device
    n, seqlen = windows.shape
    nll_sum, count = 0.0, 0
    for i in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, unit="win", leave=False):
        x = windows[i: i + batch_size].to(device)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss in window {i}: the model produces NaN/Inf logits.")
        nll_sum += loss.item()
        count += x[:, 1:].numel()
    nll = nll_sum / count
    ppl = math.exp(nll) if nll < 700 else math.inf  # exp overflows a float above ~709.8
    return PerplexityResult(ppl=ppl, nll=nll, tokens=count, windows=n, seqlen=seqlen)
