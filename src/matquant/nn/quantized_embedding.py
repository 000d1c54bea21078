"""Int8 token embedding and output head, quantized at load time from whatever the checkpoint holds.

One table per vocabulary matrix: int8 codes [vocab, hidden] and one bf16 scale per row (symmetric, absmax / 127,
the scale rounded *up* to bf16 so no code leaves [-127, 127]). Row v of the table is both token v's embedding and
the head's output channel v, so a tied embedding/head (SmolLM2, Qwen2.5-0.5B, Gemma 3) shares one table exactly:
per-row quantization of the same matrix is the same table whichever way it is read.

- `Int8Embedding` gathers the rows of the asked tokens and dequantizes only those (q · scale in float32, then the
  model dtype; Gemma's `embed_scale` applied after, as its own embedding does).
- `Int8Head` multiplies without a dense float weight: torch's CPU kernel `aten._weight_int8pack_mm` (bf16
  activations, one scale per output channel) for few rows (decoding, and the last position that `generate` asks
  for), and for many rows (perplexity, full-sequence logits) bf16 dequantization of `HEAD_CHUNK_ROWS` vocabulary
  rows at a time followed by a bf16 matmul, so at most one chunk is dense. Both run the activations in bf16 (as
  the packed int4 runtime does): the output equals the dequantized-table product up to bf16 rounding.

`quantize_embeddings(model)` replaces the model's input embedding and output head in place; the fp32 tensors are
freed. The modules hold their tables as buffers, so `nn.memory.resident_bytes` counts them (a shared table once).
A model with quantized embeddings must not be saved as a checkpoint (`has_quantized_embeddings` tells): its
embeddings are no longer the checkpoint's; reload with `quantize_embeddings=False` to save.
"""
from __future__ import annotations

import torch
from torch import nn

HEAD_CHUNK_ROWS = 8192  # vocabulary rows dequantized at a time by the many-rows head path
KERNEL_MAX_ROWS = 32  # activation rows up to which the head uses the int8 kernel (a GEMV kernel: slow for many rows)
QUANTIZE_CHUNK_ROWS = 16384  # rows quantized at a time (bounds the float temporaries at load)
_HAS_KERNEL = hasattr(torch, "_weight_int8pack_mm")  # else every call takes the chunked path


def quantize_rows_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [n, k], scales bf16 [n]): symmetric per-row int8 with scale = absmax / 127 rounded up to bf16.
    All-zero rows get scale 1 (their codes are 0)."""
    if weight.dim() != 2:
        raise ValueError(f"per-row int8 quantization needs a 2-D weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    codes = torch.empty(n, k, dtype=torch.int8, device=weight.device)
    scales = torch.empty(n, dtype=torch.bfloat16, device=weight.device)
    for s in range(0, n, QUANTIZE_CHUNK_ROWS):
        w = weight[s: s + QUANTIZE_CHUNK_ROWS].float()
        exact = w.abs().amax(dim=1) / 127
        sc = _round_up_bf16(torch.where(exact > 0, exact, torch.ones_like(exact)))
        codes[s: s + QUANTIZE_CHUNK_ROWS] = torch.round(w / sc.float()[:, None]).clamp_(-127, 127).to(torch.int8)
        scales[s: s + QUANTIZE_CHUNK_ROWS] = sc
    return codes, scales


def _round_up_bf16(x: torch.Tensor) -> torch.Tensor:
    """The smallest bf16 values >= x (x > 0, finite)."""
    b = x.to(torch.bfloat16)
    low = b.float() < x
    if low.any():
        b[low] = torch.nextafter(b[low], torch.full_like(b[low], float("inf")))
    return b


def dequantize_rows(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The reference dense table: codes · scale in float32, cast to `dtype`."""
    return (codes.float() * scales.float()[..., None]).to(dtype)


class Int8Table(nn.Module):
    """Holds one int8 table (codes + per-row bf16 scales) as buffers; `Int8Embedding` and `Int8Head` read it."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)

    @classmethod
    def from_weight(cls, weight: torch.Tensor) -> "Int8Table":
        return cls(*quantize_rows_int8(weight.detach()))


class Int8Embedding(nn.Module):
    """An `nn.Embedding` over an int8 table: gathers the token rows, then dequantizes only those."""

    def __init__(self, table: Int8Table, dtype: torch.dtype, padding_idx: int | None = None,
                 embed_scale: torch.Tensor | None = None):
        super().__init__()
        self.table = table
        self.out_dtype = dtype
        self.padding_idx = padding_idx
        self.num_embeddings, self.embedding_dim = table.codes.shape
        if embed_scale is not None:  # Gemma: the embedding is multiplied by sqrt(hidden) in the model dtype
            self.register_buffer("embed_scale", embed_scale.detach().clone(), persistent=False)
        else:
            self.embed_scale = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = dequantize_rows(self.table.codes[input_ids], self.table.scales[input_ids], self.out_dtype)
        if self.embed_scale is not None:
            rows = rows * self.embed_scale.to(self.out_dtype)
        return rows

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 per-row, out {self.out_dtype}"


class Int8Head(nn.Module):
    """A bias-free `nn.Linear` (hidden -> vocab) over an int8 table, never holding its dense weight."""

    def __init__(self, table: Int8Table, dtype: torch.dtype):
        super().__init__()
        self.table = table
        self.out_dtype = dtype
        self.out_features, self.in_features = table.codes.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        xb = x.reshape(-1, x.shape[-1]).to(torch.bfloat16).contiguous()
        codes, scales = self.table.codes, self.table.scales
        if xb.shape[0] <= KERNEL_MAX_ROWS and xb.device.type == "cpu" and _HAS_KERNEL:
            out = torch._weight_int8pack_mm(xb, codes, scales)
        else:
            out = torch.empty(xb.shape[0], self.out_features, dtype=torch.bfloat16, device=xb.device)
            for s in range(0, self.out_features, HEAD_CHUNK_ROWS):
                w = codes[s: s + HEAD_CHUNK_ROWS].to(torch.bfloat16) * scales[s: s + HEAD_CHUNK_ROWS, None]
                torch.mm(xb, w.t(), out=out[:, s: s + HEAD_CHUNK_ROWS])
        return out.to(self.out_dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-row, out {self.out_dtype}"


QUANTIZED_TYPES = (Int8Embedding, Int8Head)


def has_quantized_embeddings(model: nn.Module) -> bool:
    return any(isinstance(m, QUANTIZED_TYPES) for m in model.modules())


def _module_name(model: nn.Module, target: nn.Module) -> str | None:
    return next((n for n, m in model.named_modules() if m is target), None)


def quantize_embeddings(model: nn.Module) -> dict[str, str]:
    """Replace `model`'s input embedding and output head (transformers' `get_input_embeddings` /
    `get_output_embeddings`) by int8 per-row modules in place; a tied pair (same weight tensor) shares one table.
    Idempotent. An output head with a bias, or a module that is not a plain Embedding / Linear, is left as it is.
    Returns {module name: what was done}."""
    from matquant.nn.replace import set_submodule

    done: dict[str, str] = {}
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    emb_ok = isinstance(emb, nn.Embedding) and emb.weight.device.type != "meta"
    head_ok = (isinstance(head, nn.Linear) and head.bias is None and head.weight.device.type != "meta")
    emb_table = Int8Table.from_weight(emb.weight) if emb_ok else None
    if emb_ok:
        name = _module_name(model, emb)
        dtype = emb.weight.dtype
        set_submodule(model, name, Int8Embedding(emb_table, dtype, emb.padding_idx, getattr(emb, "embed_scale", None)))
        done[name] = "int8 per-row embedding"
    if head_ok:
        name = _module_name(model, head)
        tied = emb_ok and head.weight is emb.weight
        table = emb_table if tied else Int8Table.from_weight(head.weight)
        set_submodule(model, name, Int8Head(table, head.weight.dtype))
        done[name] = "int8 per-row head" + (" (tied: the embedding's table)" if tied else "")
    return done


def embedding_modules(model: nn.Module) -> dict[str, nn.Module]:
    """{name: module} of the model's input embedding and output head, quantized or not (for memory reports)."""
    out = {}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        m = getattr(model, getter, lambda: None)()
        if m is not None:
            name = _module_name(model, m)
            if name is not None:
                out[name] = m
    return out


__all__ = ["quantize_rows_int8", "dequantize_rows", "Int8Table", "Int8Embedding", "Int8Head", "quantize_embeddings",
           "has_quantized_embeddings", "embedding_modules", "HEAD_CHUNK_ROWS", "KERNEL_MAX_ROWS"]
