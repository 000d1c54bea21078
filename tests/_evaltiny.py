"""Tiny models and tokenizers for the evaluation / experiment tests (built in-process, no downloads)."""
from __future__ import annotations

import torch


def byte_tokenizer(extra: int = 0):
    """Byte-level tokenizer: 256 byte tokens + <s> </s> (+ `extra` dummy tokens to make a *different* tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    for s in ["<s>", "</s>"] + [f"<x{i}>" for i in range(extra)]:
        vocab[s] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="</s>")


def tiny_llama(vocab_size: int = 258, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=vocab_size, max_position_embeddings=4096,
                      bos_token_id=256, eos_token_id=257, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def save_tiny_source(path, extra_tokens: int = 0):
    """A local HF model folder (safetensors) that `load_model(path)` accepts."""
    tok = byte_tokenizer(extra_tokens)
    model = tiny_llama(vocab_size=len(tok))
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path
