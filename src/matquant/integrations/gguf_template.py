"""The template GGUF a slice is written into: its metadata, tokenizer and non-quantized tensors are reused, so it
must be of the checkpoint's model (checked here), and the GGUF tensor names and llama.cpp's row order of attn_q/attn_k
come from its architecture.

llama.cpp's converter permutes the rows of attn_q/attn_k for the architectures transformers reverse-permutes on
load (llama); the export permutes our codes and per-row constants the same way (rows only, so input-dim groups stay
whole). It stores the RMSNorm weights of Gemma, Gemma-2 and Gemma-3 as 1 + w (their norms multiply by 1 + w in
transformers, whose GGUF loader subtracts the 1 again): `norm_offset`.

The vocabulary check follows the converter's spelling of SentencePiece tokens: a USER_DEFINED token is stored with
its '\u2581' (SentencePiece's space) written as ' ' ("pre-normalized" for llama.cpp's tokenizer), so such a token
matches ours when the two are equal with '\u2581' read as a space; every other token must be equal as it is.
"""
from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np

from matquant.integrations.export_slices import ExportError

# transformers' model_type -> GGUF general.architecture, where they differ (llama.cpp writes Mistral as llama)
HF_TO_GGUF_ARCH = {"mistral": "llama", "cohere": "command-r", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
                   "gemma3_text": "gemma3"}
# GGUF architectures whose RMSNorm computes x * (1 + w): llama.cpp's converter stores w + 1 (not gemma3n, gemma4)
NORM_PLUS_ONE_ARCHS = ("gemma", "gemma2", "gemma3", "gemma-embedding")
SPM_SPACE = "\u2581"  # SentencePiece's spelling of a space
# template metadata -> model config, checked before anything is written
ARCH_KEYS = {"block_count": "num_hidden_layers", "embedding_length": "hidden_size",
             "feed_forward_length": "intermediate_size", "attention.head_count": "num_attention_heads",
             "attention.head_count_kv": "num_key_value_heads"}


def default_template() -> Path:
    """The embedded SmolLM2-135M's own shipped GGUF."""
    from matquant.models.loading import DEFAULT_MODEL, embedded_model_source

    src = embedded_model_source(DEFAULT_MODEL)
    return Path(src.path) / src.gguf_file


def llama_row_permutation(rows: int, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """Row order llama.cpp's converter gives attn_q (n_head) / attn_k (n_head_kv): out[i] = in[perm[i]]."""
    n = n_head if n_head_kv is None else n_head_kv
    return np.arange(rows).reshape(n, 2, rows // n // 2).swapaxes(1, 2).reshape(rows)


def arch_permutes_qk(arch: str) -> bool:
    """Does transformers' GGUF loader reverse-permute attn_q/attn_k for this architecture (as llama.cpp permutes)?"""
    try:
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, LlamaTensorProcessor
    except ImportError:  # pragma: no cover - older/newer transformers layout
        return arch == "llama"
    proc = TENSOR_PROCESSORS.get(arch)
    return proc is not None and issubclass(proc, LlamaTensorProcessor)


def norm_offset(arch: str, hf_name: str) -> float:
    """What llama.cpp's converter adds to the HF tensor `hf_name` of an `arch` model: 1.0 for the RMSNorm weights
    of the Gemma family (every '...norm.weight', as the converter matches them), else 0.0."""
    return 1.0 if arch in NORM_PLUS_ONE_ARCHS and hf_name.endswith("norm.weight") else 0.0


def same_token(ours: str, theirs: str, theirs_type: int | None) -> bool:
    """Is the template's token `theirs` (GGUF token type `theirs_type`) the tokenizer's token `ours`? Equal, or a
    USER_DEFINED template token equal to ours with SentencePiece's '\u2581' read as a space on both sides."""
    if ours == theirs:
        return True
    return (theirs_type == int(gguf.TokenType.USER_DEFINED)
            and ours.replace(SPM_SPACE, " ") == theirs.replace(SPM_SPACE, " "))


def gguf_arch(config) -> str:
    """The GGUF general.architecture of a transformers config (llama.cpp's name for its model_type)."""
    return HF_TO_GGUF_ARCH.get(config.model_type, config.model_type)


_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def leading_scalar_fields(path) -> dict:
    """The scalar metadata of a GGUF file before its tokenizer keys (arrays skipped), read with a few small reads:
    whether a template can be of a model at all, without parsing its tokenizer (gguf-py's reader parses every
    array, seconds for a large vocabulary)."""
    out = {}
    with open(path, "rb") as f:
        magic, version = struct.unpack("<4sI", f.read(8))
        if magic != b"GGUF" or version < 3:
            return out
        _, n_kv = struct.unpack("<QQ", f.read(16))
        for _ in range(n_kv):
            (n,) = struct.unpack("<Q", f.read(8))
            key = f.read(n).decode("utf-8", "replace")
            if key.startswith("tokenizer."):
                break
            (vtype,) = struct.unpack("<I", f.read(4))
            if vtype == _STRING:
                (n,) = struct.unpack("<Q", f.read(8))
                out[key] = f.read(n).decode("utf-8", "replace")
            elif vtype in _SCALAR:
                fmt = _SCALAR[vtype]
                (out[key],) = struct.unpack(fmt, f.read(struct.calcsize(fmt)))
            elif vtype == _ARRAY:
                itype, count = struct.unpack("<IQ", f.read(12))
                if itype in _SCALAR:
                    f.seek(count * struct.calcsize(_SCALAR[itype]), 1)
                elif itype == _STRING:
                    for _ in range(count):
                        (n,) = struct.unpack("<Q", f.read(8))
                        f.seek(n, 1)
                else:
                    break
            else:
                break
    return out


def could_be_template_of(path, config) -> bool:
    """False when the GGUF's leading metadata already shows another architecture or size than `config`."""
    try:
        fields = leading_scalar_fields(path)
    except (OSError, struct.error):
        return False
    arch = fields.get("general.architecture")
    if arch != gguf_arch(config):
        return False
    for key, attr in ARCH_KEYS.items():
        tv, cv = fields.get(f"{arch}.{key}"), getattr(config, attr, None)
        if tv is not None and cv is not None and int(tv) != int(cv):
            return False
    return True


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def check_template(reader, config, tokenizer, template: Path) -> str:
    """The template's architecture, after refusing one that is not the checkpoint's model."""
    arch = _field(reader, "general.architecture")
    want = gguf_arch(config)
    hint = (" Pass --template with a GGUF of the checkpoint's source model (made by llama.cpp's "
            "convert_hf_to_gguf.py, see docs/export.md).")
    if arch != want:
        raise ExportError(f"template {template} is a {arch!r} model but the checkpoint is {config.model_type!r} "
                          f"(GGUF architecture {want!r}).{hint}")
    for key, attr in ARCH_KEYS.items():
        tv, cv = _field(reader, f"{arch}.{key}"), getattr(config, attr, None)
        if tv is not None and cv is not None and int(tv) != int(cv):
            raise ExportError(f"template {template} has {arch}.{key} = {tv} but the checkpoint's {attr} is {cv}: "
                              f"another model size.{hint}")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None and tokenizer is not None:
        n = len(tokens.data)
        ours = tokenizer.convert_ids_to_tokens(list(range(min(n, len(tokenizer)))))
        theirs = tokens.contents()
        types = reader.fields.get("tokenizer.ggml.token_type")
        types = types.contents() if types is not None else []
        bad = [i for i, (x, y) in enumerate(zip(ours, theirs))
               if x != y and not same_token(x, y, types[i] if i < len(types) else None)]
        if bad or len(tokenizer) > n:
            i = bad[0] if bad else n
            first = f": {theirs[i]!r} vs ours {ours[i]!r}" if bad else ""
            raise ExportError(f"template {template}'s vocabulary differs from the checkpoint's tokenizer (first at "
                              f"id {i}{first}; {len(bad)} ids differ, {n} vs {len(tokenizer)} tokens).{hint}")
    return arch


def gguf_tensor_names(arch: str, n_layers: int):
    """HF tensor name -> GGUF tensor name (None where the architecture has none) for `arch`."""
    arch_enum = next((k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), None)
    if arch_enum is None:
        raise ExportError(f"gguf {gguf.__version__ if hasattr(gguf, '__version__') else ''} does not know the "
                          f"architecture {arch!r}; upgrade the gguf package.")
    name_map = gguf.get_tensor_name_map(arch_enum, n_layers)

    def to_gguf(hf_name: str) -> str | None:
        base, _, suffix = hf_name.rpartition(".")
        g = name_map.get_name(base)
        return f"{g}.{suffix}" if g is not None else None

    return to_gguf
