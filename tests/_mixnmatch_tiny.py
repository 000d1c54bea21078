"""Tiny models/checkpoints for the Mix'n'Match tests (self-contained: no shared conftest needed)."""
from __future__ import annotations

import _tiny
import torch

TEXT = _tiny.TEXT * 60


def tiny_tokenizer():
    return _tiny.bpe_tokenizer(256, 60)


def tiny_llama(layers: int = 4, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=320, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def quantized_tiny(layers: int = 4, scope: str = "ffn", slicing: str = "paper", seed: int = 0):
    from matquant.algorithms import quantize_model

    fp = tiny_llama(layers, seed)
    q = tiny_llama(layers, seed)
    qcfg = quantize_model(q, "rtn", master_bits=8, group_size=32, scope=scope, slicing=slicing, progress=False)
    return fp, q, qcfg


def make_dirs(tmp_path, layers: int = 4, scope: str = "ffn"):
    """(reference fp32 folder, matquant checkpoint folder, calibration text file)."""
    from matquant.format.checkpoint import save_checkpoint

    tok = tiny_tokenizer()
    fp, q, qcfg = quantized_tiny(layers, scope)
    ref = tmp_path / "ref"
    fp.save_pretrained(ref)
    tok.save_pretrained(ref)
    ckpt = tmp_path / "ckpt"
    save_checkpoint(q, tok, ckpt, qcfg)
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    return ref, ckpt, text
