"""`rotate='residual'`: one randomized Hadamard Q over the residual stream, folded into the weights (QuaRot-style).

A pre-norm decoder (Llama, Mistral, Qwen2/3) computes h ← h + f(RMSNorm(h)) with every f reading its input through
linears (q/k/v, gate/up; the final norm feeds lm_head) and writing back through linears (o_proj, down_proj). With
Q orthogonal (QᵀQ = I) and each RMSNorm's scale γ first multiplied into the linears it feeds (RMSNorm then has
γ = 1, and rms(h·Q) = rms(h)), the model with

    embeddings E·Q;  reading linears W·diag(γ)·Q;  writing linears Qᵀ·W (and bias·Q);  lm_head W·diag(γ_final)·Q

carries h·Q in its residual stream and computes exactly the same logits (to fp32 rounding). Nothing runs online:
the rotated model is a plain model of the same architecture (with lm_head untied from the embeddings when they
were tied, since E·Q ≠ E·diag(γ_final)·Q), so every backend, `from_pretrained` and the GGUF / compressed-tensors
exports run it as they run any checkpoint. Quantization sees rotated weights: inputs of q/k/v/gate/up (their
groups), and the output rows of o/down. down_proj's input (the FFN's inner activations) is not rotated; that would
need an online transform (`rotate='input'`).

Q = D·Hᵀ/√d (quant/rotation.py: randomized Hadamard over the hidden size d, seeded), applied in float64.
"""
from __future__ import annotations

import torch

from matquant.quant.rotation import InputRotation

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")  # pre-RMSNorm decoders with the names used below
READS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")  # fed by input_layernorm
READS_MLP = ("mlp.gate_proj", "mlp.up_proj")  # fed by post_attention_layernorm
WRITES = ("self_attn.o_proj", "mlp.down_proj")  # add into the residual stream


def check_residual_model(model) -> None:
    """A clear error if `model` is not a decoder this fold knows (before any weight changes)."""
    mt = getattr(getattr(model, "config", None), "model_type", None)
    if mt not in ARCHITECTURES:
        raise ValueError(f"rotate='residual' folds a rotation into pre-RMSNorm decoders ({', '.join(ARCHITECTURES)}); "
                         f"this model is {mt!r}. Use rotate='input' or 'block' (online, any architecture).")
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    norms = [inner.norm] + [m for layer in inner.layers for m in (layer.input_layernorm,
                                                                  layer.post_attention_layernorm)]
    bad = {type(n).__name__ for n in norms if "RMSNorm" not in type(n).__name__ or not hasattr(n, "weight")}
    if bad:
        raise ValueError(f"rotate='residual' needs RMSNorm with a scale before every block; found {sorted(bad)}. "
                         "Use rotate='input' or 'block'.")
    if getattr(model, "lm_head", None) is None or getattr(model.lm_head, "bias", None) is not None:
        raise ValueError("rotate='residual' needs a bias-free lm_head; use rotate='input' or 'block'.")


@torch.no_grad()
def fold_residual_rotation(model, seed: int = 0) -> None:
    """Rotate `model`'s residual stream in place (see the module docstring); the float model's logits are unchanged."""
    check_residual_model(model)
    inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    d = model.config.hidden_size
    q = InputRotation({"mode": "input", "kind": "hadamard", "seed": seed}, d)

    def reads(linear, gamma):  # W ← W·diag(γ)·Q
        w = linear.weight
        w.copy_(q.rotate_weight(w.double() * gamma.double()).to(w.dtype))

    def writes(linear):  # W ← Qᵀ·W, b ← b·Q
        w = linear.weight
        w.copy_(q.rotate_weight(w.double().t()).t().to(w.dtype))
        if linear.bias is not None:
            linear.bias.copy_(q.rotate_weight(linear.bias.double()[None])[0].to(linear.bias.dtype))

    emb = model.get_input_embeddings()
    head = model.lm_head
    if head.weight is emb.weight or head.weight.data_ptr() == emb.weight.data_ptr():  # tied: untie first
        head.weight = torch.nn.Parameter(emb.weight.detach().clone(), requires_grad=emb.weight.requires_grad)
    model.config.tie_word_embeddings = False
    emb.weight.copy_(q.rotate_weight(emb.weight.double()).to(emb.weight.dtype))
    for layer in inner.layers:
        for norm, names in ((layer.input_layernorm, READS), (layer.post_attention_layernorm, READS_MLP)):
            for n in names:
                reads(layer.get_submodule(n), norm.weight)
            norm.weight.fill_(1.0)
        for n in WRITES:
            writes(layer.get_submodule(n))
    reads(head, inner.norm.weight)
    inner.norm.weight.fill_(1.0)
