"""Perplexity in the GPTQ-paper protocol: non-overlapping windows of the tokenized text, exp(mean NLL).

The loss is computed from the model's final hidden states a chunk of tokens at a time (`hidden_nll`): the output head
and the log-softmax run on at most `LOGIT_CHUNK_BYTES` of logits, so no [batch, seqlen, vocab] float32 tensor is ever
built (for a 262k-token vocabulary that tensor is 2 GiB per 2048-token window). experiments/streamed_eval.py computes
the same loss after running the blocks one at a time.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

LOGIT_CHUNK_BYTES = 64 * 2**20  # float32 logits of one loss chunk (the log-softmax needs as much again)


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int  # predicted tokens (windows × (seqlen − 1))
    windows: int
    seqlen: int

    def to_dict(self):
        return asdict(self)


def result_from_sum(nll_sum: float, count: int, windows: int, seqlen: int) -> PerplexityResult:
    """PerplexityResult of a summed NLL over `count` predicted tokens."""
    nll = nll_sum / count
    ppl = math.exp(nll) if nll < 700 else math.inf  # exp overflows a float above ~709.8
    return PerplexityResult(ppl=ppl, nll=nll, tokens=count, windows=windows, seqlen=seqlen)


def chunk_tokens(vocab_size: int, chunk_bytes: int = LOGIT_CHUNK_BYTES) -> int:
    """Tokens per loss chunk: as many float32 logit rows as fit in `chunk_bytes` (at least one)."""
    return max(1, chunk_bytes // (4 * max(1, vocab_size)))


def base_model(model: nn.Module) -> nn.Module:
    """The decoder under a causal-LM head (model.model for Llama, model.transformer for GPT-2)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if not isinstance(base, nn.Module) or base is model or model.get_output_embeddings() is None:
        raise ValueError(f"{type(model).__name__} is not a causal LM with an output head over a base model; "
                         "perplexity needs an AutoModelForCausalLM-style model.")
    return base


class _HiddenStates(nn.Module):
    """Stands in for the base model: returns the given final hidden states as its output. A head whose forward calls
    a part of the base model (OPT: `self.model.decoder(...)`) gets the stand-in for that part too."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("_"):
                raise
            return self

    def forward(self, *args, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPast

        class Output(BaseModelOutputWithPast):
            def __getattr__(self, name):  # any other output a head's forward passes on (cross_attentions): None
                if name.startswith("__"):
                    raise AttributeError(name)
                return None

        return Output(last_hidden_state=self.hidden)


@contextmanager
def _base_replaced(model: nn.Module, stand_in: nn.Module):
    prefix = model.base_model_prefix
    base = model._modules[prefix]
    model._modules[prefix] = stand_in
    try:
        yield
    finally:
        model._modules[prefix] = base


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Float32 logits of final hidden states [b, t, h]: the model's own forward after its base model (the output
    head and whatever the architecture applies after it, e.g. Gemma's final logit soft-capping), with the base model
    standing in as `hidden`."""
    with _base_replaced(model, _HiddenStates(hidden)):
        ids = torch.zeros(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        return model(input_ids=ids, use_cache=False).logits.float()


def hidden_nll(model: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor,
               chunk_bytes: int = LOGIT_CHUNK_BYTES) -> float:
    """Summed next-token NLL of `input_ids` [b, s] given the final hidden states [b, s, h] of the same windows (before
    the output head), computed over chunks of tokens so at most `chunk_bytes` of logits exist at a time."""
    if hidden.shape[:2] != input_ids.shape:
        raise ValueError(f"hidden states {tuple(hidden.shape)} do not match the token windows {tuple(input_ids.shape)}")
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    y = input_ids[:, 1:].reshape(-1).to(hidden.device)
    step = chunk_tokens(model.config.get_text_config().vocab_size, chunk_bytes)
    total = 0.0
    for s in range(0, h.shape[0], step):
        logits = head_logits(model, h[s: s + step].unsqueeze(0))[0]
        loss = F.cross_entropy(logits, y[s: s + step], reduction="sum")
        if not torch.isfinite(loss):
            raise FloatingPointError("non-finite loss: the model produces NaN/Inf logits.")
        total += loss.item()
    return total


@torch.inference_mode()
def perplexity(model, windows: torch.Tensor, batch_size: int = 1, desc: str = "perplexity",
               progress: bool = True, chunk_bytes: int = LOGIT_CHUNK_BYTES) -> PerplexityResult:
    """exp(mean next-token NLL) over `windows` [n, seqlen]; each window is scored independently. The loss is computed
    from the final hidden states in chunks of tokens (`hidden_nll`), never from a whole [batch, seqlen, vocab]
    tensor."""
    device = next(model.parameters()).device
    base = base_model(model)
    n, seqlen = windows.shape
    nll_sum, count = 0.0, 0
    for i in tqdm(range(0, n, batch_size), desc=desc, disable=not progress, unit="win", leave=False):
        x = windows[i: i + batch_size].to(device)
        hidden = base(input_ids=x, use_cache=False).last_hidden_state
        try:
            nll_sum += hidden_nll(model, hidden, x, chunk_bytes)
        except FloatingPointError:
            raise FloatingPointError(f"non-finite loss in window {i}: the model produces NaN/Inf logits.") from None
        count += x[:, 1:].numel()
    return result_from_sum(nll_sum, count, n, seqlen)


@torch.inference_mode()
def full_logits_perplexity(model, windows: torch.Tensor, batch_size: int = 1) -> PerplexityResult:
    """The reference `perplexity` is checked against: the whole [batch, seqlen, vocab] logits of the model's forward
    and one cross-entropy per batch (memory grows with the vocabulary; for tests and comparisons)."""
    device = next(model.parameters()).device
    n, seqlen = windows.shape
    nll_sum, count = 0.0, 0
    for i in range(0, n, batch_size):
        x = windows[i: i + batch_size].to(device)
        logits = model(input_ids=x, use_cache=False).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        nll_sum += loss.item()
        count += x[:, 1:].numel()
    return result_from_sum(nll_sum, count, n, seqlen)
