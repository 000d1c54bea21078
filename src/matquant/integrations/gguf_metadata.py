"""GGUF metadata and tokenizer written from a checkpoint's HF config and tokenizer, for a model that has no template
GGUF (it came from an HF folder). Follows llama.cpp's own conversion conventions (convert_hf_to_gguf.py and gguf-py
of llama.cpp; written here with gguf-py's GGUFWriter, not copied):

- architecture keys `{arch}.*`: block_count, context_length (max_position_embeddings), embedding_length,
  feed_forward_length, attention.head_count / head_count_kv, rope.freq_base (rope theta), attention.
  layer_norm_rms_epsilon, key/value_length where the config states head_dim; llama adds vocab_size and
  rope.dimension_count. RoPE scaling: none or linear (others need llama.cpp's converter: refused, clear error).
- tokenizer of a byte-level BPE `tokenizer.json` as llama.cpp's "gpt2" model: one token per id up to the config's
  vocab_size (ids the tokenizer lacks become "[PAD<id>]", type UNUSED; added tokens CONTROL when special or
  looking special like "<|...|>", else USER_DEFINED; the rest NORMAL), the merges, special token ids, add_bos/eos and
  the chat template (gguf-py's SpecialVocab), and `tokenizer.ggml.pre`, the pre-tokenizer llama.cpp should run,
  recognised from the tokenizer's own pre-tokenizer definition (`pre_tokenizer_name`).
- Llama's attn_q / attn_k rows are permuted by the exporter (gguf_template.llama_row_permutation), as the converter
  does for llama (not for qwen2).

Supported architectures: llama (and mistral, written as llama) and qwen2; others need a template GGUF.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import gguf

from matquant.integrations.export_slices import ExportError

SUPPORTED_ARCHS = ("llama", "qwen2")
HINT = (" Make a GGUF of the source model with llama.cpp's convert_hf_to_gguf.py and pass it as --template "
        "(docs/export.md).")
# the regex of a `Split` pre-tokenizer (before a ByteLevel without its own regex) -> llama.cpp's pre-tokenizer name
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_REGEX_PRE = {_WORDS + r"\p{N}" + _REST: "qwen2", _WORDS + r"\p{N}{1,3}" + _REST: "llama-bpe"}


def _rope_theta(config) -> float | None:
    rp = getattr(config, "rope_parameters", None) or {}
    rp = rp.get("full_attention", rp) if isinstance(rp, dict) else {}
    return rp.get("rope_theta", getattr(config, "rope_theta", None))


def _rope_scaling(config) -> tuple[str | None, float | None]:
    rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rp = rp.get("full_attention", rp) if isinstance(rp, dict) else {}
    return rp.get("rope_type", rp.get("type")), rp.get("factor")


def add_arch_metadata(writer, arch: str, config) -> None:
    """The `{arch}.*` keys llama.cpp reads for `arch`, from the transformers config."""
    if arch not in SUPPORTED_ARCHS:
        raise ExportError(f"no template GGUF and matquant writes GGUF metadata itself only for "
                          f"{', '.join(SUPPORTED_ARCHS)} models; this checkpoint is {config.model_type!r} (GGUF architecture {arch!r}).{HINT}")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    rope_type, factor = _rope_scaling(config)
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif rope_type not in (None, "default"):
        raise ExportError(f"the checkpoint's RoPE scaling {rope_type!r} is not written by matquant's own GGUF "
                          f"metadata.{HINT}")
    if (theta := _rope_theta(config)) is not None:
        writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "llama":
        writer.add_vocab_size(config.vocab_size)
        writer.add_rope_dimension_count(head_dim or config.hidden_size // config.num_attention_heads)


def pre_tokenizer_name(tokenizer_json: dict) -> str | None:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer.json, or None if not recognised:
    ByteLevel with its own (GPT-2) regex -> 'gpt-2'; single digits split off first, then that -> 'smollm'; a Split
    regex then ByteLevel without one -> by the regex (SPLIT_REGEX_PRE: 'qwen2', 'llama-bpe')."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        return SPLIT_REGEX_PRE.get((steps[0].get("pattern") or {}).get("Regex"))
    return None


def _looks_special(token: str) -> bool:
    """llama.cpp's converter marks such added tokens CONTROL even where the tokenizer does not call them special."""
    return (token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (token.startswith("<|") and token.endswith("|>"))
            or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<unused") and token.endswith(">")))


def vocab_tokens(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, token types) for ids 0..vocab_size-1, by llama.cpp's conventions (module docstring)."""
    vocab = tokenizer.get_vocab()
    if vocab and max(vocab.values()) >= vocab_size:
        raise ExportError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is "
                          f"{vocab_size}; the checkpoint's tokenizer is not the model's.")
    by_id = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
            continue
        if tok in added:
            if not decoder[i].normalized:  # llama.cpp expects CONTROL / USER_DEFINED tokens pre-normalized
                tok = tokenizer.decode(tokenizer.encode(tok, add_special_tokens=False))
            if decoder[i].special or _looks_special(tok):
                types.append(int(gguf.TokenType.CONTROL))
            else:
                tok = tok.replace("\u2581", " ")
                types.append(int(gguf.TokenType.USER_DEFINED))
        else:
            types.append(int(gguf.TokenType.NORMAL))
        tokens.append(tok)
    return tokens, types


def add_tokenizer(writer, arch: str, config, tokenizer, tokenizer_dir) -> list[str]:
    """The tokenizer keys (llama.cpp's "gpt2" BPE model); returns notes for the export report."""
    if tokenizer is None:
        raise ExportError("the checkpoint has no tokenizer; a GGUF without a template needs one.")
    tok_json = json.loads(tokenizer.backend_tokenizer.to_str()) if hasattr(tokenizer, "backend_tokenizer") else {}
    model = tok_json.get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError("matquant writes GGUF tokenizers itself only for byte-level BPE tokenizers (tokenizer.json, "
                          f"as GPT-2, Llama-3, Qwen2, SmolLM2 use); this one is {model.get('type') or 'not one'}"
                          f"{' with byte fallback (sentencepiece-like)' if model.get('byte_fallback') else ''}.{HINT}")
    notes = []
    pre = pre_tokenizer_name(tok_json)
    if pre is None:
        notes.append("the tokenizer's pre-tokenizer is not one matquant recognises; written as llama.cpp's "
                     "'default' (llama.cpp warns that its tokenization may differ from the model's)")
        pre = "default"
    tokens, types = vocab_tokens(tokenizer, config.vocab_size)
    cfg_path = Path(tokenizer_dir, "tokenizer_config.json") if tokenizer_dir is not None else None
    if arch == "llama" and cfg_path is not None and cfg_path.exists():
        add_prefix_space = json.loads(cfg_path.read_text()).get("add_prefix_space")
        if add_prefix_space is not None:
            writer.add_add_space_prefix(add_prefix_space)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory() as tmp:
        folder = tokenizer_dir
        if folder is None or not Path(folder, "tokenizer.json").exists():
            tokenizer.save_pretrained(tmp)
            folder = tmp
        special = gguf.SpecialVocab(Path(folder), load_merges=True, n_vocab=config.vocab_size)
        if not special.merges:
            raise ExportError(f"the tokenizer in {folder} has no BPE merges; llama.cpp's gpt2 tokenizer needs "
                              f"them.{HINT}")
        special.add_to_gguf(writer, quiet=True)
    if arch == "llama" and config.vocab_size == 49152 and "tokenizer.ggml.add_bos_token" not in _keys(writer):
        writer.add_add_bos_token(False)  # llama.cpp's converter: granite/SmolLM-sized llama vocabularies add no BOS
    return notes


def _keys(writer) -> set[str]:
    return {k for kv in writer.kv_data for k in kv}


def add_hf_metadata(writer, arch: str, config, tokenizer, tokenizer_dir) -> list[str]:
    """Every metadata key of a GGUF without a template: general, architecture, tokenizer; returns report notes."""
    add_arch_metadata(writer, arch, config)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    return add_tokenizer(writer, arch, config, tokenizer, tokenizer_dir)
