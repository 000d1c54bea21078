"""Export a slice (or a Mix'n'Match bits map) of a matquant checkpoint as ONE GGUF file for llama.cpp.

Metadata, tokenizer and every tensor we do not quantize come from a *template* GGUF of the same model (the
embedded model's own shipped GGUF by default; for other models one written by llama.cpp's convert_hf_to_gguf.py).
Each quantized module is written with its own GGML type (a bits map gives per-tensor types in one file):

  levels of the slice <= 16 (r <= 4; `extra` r <= 3)  -> Q4_1, exact (d = A, m = B per 32-block; fp16 rounding)
  levels <= 32 (r = 5; `extra` r = 4)                  -> Q5_1, exact
  otherwise (r = 6, 7, 8)                              -> Q8_0, nearest (per-32 scale fitted to the slice)
  --k-quants: r = 6 -> Q6_K, r = 3 -> Q3_K, r = 2 -> Q2_K, nearest, only for tensors whose rows (input width) are
              divisible by 256; the others keep the exact/nearest type above (reported).

Exact types need the group size to be a multiple of 32 (a group is a whole number of blocks sharing d, m).
llama.cpp's converter permutes the rows of attn_q/attn_k for the architectures transformers reverse-permutes on
load (llama); we permute our codes and per-row constants the same way (rows only, so input-dim groups stay whole).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from matquant.format.atomic import atomic_file
from matquant.integrations import gguf_blocks as gb
from matquant.integrations.export_slices import ExportError, SliceTensor, check_out_path, model_slices, plain_tensors

# transformers' model_type -> GGUF general.architecture, where they differ (llama.cpp writes Mistral as llama)
HF_TO_GGUF_ARCH = {"mistral": "llama", "cohere": "command-r", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe",
                   "gemma3_text": "gemma3"}
# template metadata -> model config, checked before anything is written
ARCH_KEYS = {"block_count": "num_hidden_layers", "embedding_length": "hidden_size",
             "feed_forward_length": "intermediate_size", "attention.head_count": "num_attention_heads",
             "attention.head_count_kv": "num_key_value_heads"}
K_QUANT_FOR_BITS = {6: "Q6_K", 3: "Q3_K", 2: "Q2_K"}
FILE_TYPE = {"Q4_1": "MOSTLY_Q4_1", "Q5_1": "MOSTLY_Q5_1", "Q8_0": "MOSTLY_Q8_0", "Q6_K": "MOSTLY_Q6_K",
             "Q3_K": "MOSTLY_Q3_K_M", "Q2_K": "MOSTLY_Q2_K"}


def default_template() -> Path:
    """The embedded SmolLM2-135M's own shipped GGUF."""
    from matquant.models.loading import DEFAULT_MODEL, embedded_model_source

    src = embedded_model_source(DEFAULT_MODEL)
    return Path(src.path) / src.gguf_file


def bits_per_weight(qtype_name: str) -> float:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[qtype_name]]
    return nbytes * 8 / block


@dataclass
class TensorChoice:
    qtype: str
    exact: bool
    note: str = ""


def choose_type(st: SliceTensor, k_quants: bool = False) -> TensorChoice:
    """The GGML type an r-bit slice is written as (see the module docstring)."""
    cols = st.shape[1]
    note = ""
    if k_quants and st.bits in K_QUANT_FOR_BITS and st.levels == 2**st.bits:
        if cols % gb.QK_K == 0 and st.group_size % 16 == 0:
            return TensorChoice(K_QUANT_FOR_BITS[st.bits], exact=False)
        note = (f"{K_QUANT_FOR_BITS[st.bits]} needs rows divisible by 256 (and groups of 16); this tensor's rows "
                f"are {cols} wide, written as ")
    if st.levels <= 32:
        qtype = "Q4_1" if st.levels <= 16 else "Q5_1"
        if st.group_size % gb.QK:
            raise ExportError(
                f"{st.module}: group size {st.group_size} is not a multiple of 32, so {qtype} (one d, m per "
                f"32-block) cannot hold the {st.bits}-bit slice exactly. Quantize with --group-size 32, 64, 128 "
                "or -1 (per channel) to export it to GGUF.")
        return TensorChoice(qtype, exact=True, note=note + f"{qtype} (exact)" if note else "")
    return TensorChoice("Q8_0", exact=False, note=note + "Q8_0 (nearest)" if note else "")


def encode_slice(st: SliceTensor, qtype: str, perm: np.ndarray | None = None) -> np.ndarray:
    """Raw GGML bytes [rows, bytes per row] of the slice in `qtype` (rows permuted by `perm` if given)."""
    codes, a, b = st.codes.numpy(), st.a.numpy(), st.b.numpy()
    values = st.reference.numpy()
    if perm is not None:
        codes, a, b, values = codes[perm], a[perm], b[perm], values[perm]
    if qtype in ("Q4_1", "Q5_1"):
        d, m = gb.group_to_blocks(a, st.group_size, gb.QK), gb.group_to_blocks(b, st.group_size, gb.QK)
        codes, m = gb.recentre_codes(codes, d, m, 15 if qtype == "Q4_1" else 31)
        return (gb.encode_q4_1 if qtype == "Q4_1" else gb.encode_q5_1)(codes, d, m)
    if qtype == "Q8_0":
        return gb.encode_q8_0(values)
    if qtype == "Q6_K":
        return gb.encode_q6_k(values)
    if qtype == "Q3_K":
        return gb.encode_q3_k(values)
    if qtype == "Q2_K":
        ga, gbb = np.repeat(a, st.group_size, axis=1), np.repeat(b, st.group_size, axis=1)
        return gb.encode_q2_k(values, ga, gbb)
    raise ExportError(f"no GGUF encoder for {qtype}")


def llama_row_permutation(rows: int, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """Row order llama.cpp's converter gives attn_q (n_head) / attn_k (n_head_kv): out[i] = in[perm[i]]."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    idx = np.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


def _arch_permutes_qk(arch: str) -> bool:
    """Does transformers' GGUF loader reverse-permute attn_q/attn_k for this architecture (as llama.cpp permutes)?"""
    try:
        from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, LlamaTensorProcessor
    except ImportError:  # pragma: no cover - older/newer transformers layout
        return arch == "llama"
    proc = TENSOR_PROCESSORS.get(arch)
    return proc is not None and issubclass(proc, LlamaTensorProcessor)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def check_template(reader, config, tokenizer, template: Path) -> str:
    """The template's architecture, after refusing one that is not the checkpoint's model."""
    arch = _field(reader, "general.architecture")
    want = HF_TO_GGUF_ARCH.get(config.model_type, config.model_type)
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
        bad = [i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y]
        if bad or len(tokenizer) > n:
            i = bad[0] if bad else n
            raise ExportError(f"template {template}'s vocabulary differs from the checkpoint's tokenizer (first at "
                              f"id {i}; {len(bad)} ids differ, {n} vs {len(tokenizer)} tokens).{hint}")
    return arch


@dataclass
class TensorReport:
    name: str
    module: str
    bits: int
    qtype: str
    exact: bool
    numel: int
    nbytes: int
    rms_error: float       # vs matquant's slice, read back with gguf-py's dequantizer
    max_error: float
    rel_rms_error: float   # rms error / rms of the slice
    note: str = ""


@dataclass
class GGUFExportReport:
    path: Path
    tensors: list[TensorReport] = field(default_factory=list)
    copied: int = 0                 # template tensors copied byte for byte
    rewritten: list[str] = field(default_factory=list)  # non-quantized tensors that differ from the template (F32)
    file_bytes: int = 0

    @property
    def bits_per_weight(self) -> float:
        """Real bits per weight over the quantized tensors, from the bytes written."""
        return 8 * sum(t.nbytes for t in self.tensors) / max(sum(t.numel for t in self.tensors), 1)

    def summary(self) -> str:
        from collections import Counter

        kinds = Counter((t.qtype, t.exact) for t in self.tensors)
        kinds_s = ", ".join(f"{n}x {q} ({'exact' if e else 'nearest'})" for (q, e), n in sorted(kinds.items()))
        worst = max(self.tensors, key=lambda t: t.rel_rms_error)
        lines = [f"wrote {self.path} ({self.file_bytes / 2**20:.1f} MiB): {kinds_s}; "
                 f"{self.bits_per_weight:.3f} bits/weight over the quantized tensors",
                 f"  weight error vs the slice: worst relative rms {worst.rel_rms_error:.2e} ({worst.name}), "
                 f"worst max abs {max(t.max_error for t in self.tensors):.2e}",
                 f"  {self.copied} tensor(s) copied from the template"]
        if self.rewritten:
            lines.append(f"  {len(self.rewritten)} non-quantized tensor(s) differ from the template and were "
                         f"written as F32 from the checkpoint, e.g. {self.rewritten[:2]}")
        notes = sorted({t.note for t in self.tensors if t.note})
        lines += [f"  note: {n}" for n in notes]
        return "\n".join(lines)


def _gguf_names(arch: str, n_layers: int):
    import gguf

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


def _close_to_template(tpl: np.ndarray, ours: np.ndarray) -> bool:
    if tpl.shape != ours.shape:
        return False
    scale = float(np.abs(ours).max()) or 1.0
    return float(np.abs(tpl.astype(np.float32) - ours).max()) <= 1e-3 * scale


def export_gguf(model, tokenizer, out, template=None, k_quants: bool = False, overwrite: bool = False,
                metadata: dict | None = None, dense: str | None = None) -> GGUFExportReport:
    """Write the model's current slice (per-module bits) as one GGUF file built on `template`.

    `dense` ('F32' or 'F16'): write the slice's dequantized values instead of GGML blocks (the like-for-like
    reference for llama.cpp's own perplexity tool)."""
    from matquant.nn.rotation import online_rotation_refusal

    if (why := online_rotation_refusal(model, "llama.cpp (GGUF)")) is not None:
        raise ExportError(why)
    import json

    import gguf
    from gguf.quants import dequantize

    template = Path(template) if template is not None else default_template()
    if not template.is_file():
        raise FileNotFoundError(f"template GGUF {template} does not exist.")
    check_out_path(out, overwrite)
    try:
        reader = gguf.GGUFReader(str(template))
    except Exception as e:
        raise ExportError(f"template {template} is not a readable GGUF file ({e}).") from None
    cfg = model.config
    arch = check_template(reader, cfg, tokenizer, template)
    to_gguf = _gguf_names(arch, cfg.num_hidden_layers)
    permute = _arch_permutes_qk(arch)

    slices = model_slices(model)
    plain = plain_tensors(model)
    tpl_names = {t.name for t in reader.tensors}
    hf_of: dict[str, str] = {}
    extra: dict[str, str] = {}  # GGUF name -> plain tensor the template lacks: an untied output head
    for hf in list(slices) + list(plain):
        key = hf if hf in plain else f"{hf}.weight"
        g = to_gguf(key)
        if g is None or g not in tpl_names:
            if hf in plain and _is_output_head(model, hf):
                if getattr(model.config, "tie_word_embeddings", False):
                    continue  # tied: the template (like llama.cpp's output) stores no separate output tensor
                if g is not None:
                    extra[g] = hf  # e.g. rotate='residual' unties lm_head; llama.cpp reads output.weight when present
                    continue
            raise ExportError(f"template {template} has no tensor for the checkpoint's {key} (GGUF name {g}); "
                              "the template is of another model. Pass --template made from the checkpoint's source.")
        hf_of[g] = hf

    def perm_for(gname: str, rows: int):
        if not permute:
            return None
        if ".attn_q." in gname:
            return llama_row_permutation(rows, cfg.num_attention_heads)
        if ".attn_k." in gname:
            return llama_row_permutation(rows, cfg.num_attention_heads, cfg.num_key_value_heads)
        return None

    report = GGUFExportReport(Path(out))
    types_used: dict[str, int] = {}
    with atomic_file(check_out_path(Path(out), overwrite)) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        for f in reader.fields.values():
            if f.name.startswith("GGUF.") or f.name in ("general.architecture", "general.file_type"):
                continue
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
        for t in reader.tensors:
            hf = hf_of.get(t.name)
            shape = tuple(int(x) for x in reversed(t.shape))  # numpy order: [rows (out), cols (in)]
            if hf in slices:
                st = slices[hf]
                if shape != st.shape:
                    raise ExportError(f"template tensor {t.name} has shape {shape} but the checkpoint's {hf} is "
                                      f"{st.shape}: the template is of another model.")
                choice = choose_type(st, k_quants) if dense is None else TensorChoice(dense, exact=dense == "F32")
                perm = perm_for(t.name, st.shape[0])
                qtype = gguf.GGMLQuantizationType[choice.qtype]
                if dense is None:
                    raw = encode_slice(st, choice.qtype, perm)
                else:
                    ref = st.reference.numpy()[perm] if perm is not None else st.reference.numpy()
                    raw = np.ascontiguousarray(ref, dtype=np.float32 if dense == "F32" else np.float16)
                writer.add_tensor(t.name, raw, raw_dtype=qtype)
                back = dequantize(raw, qtype).reshape(st.shape)
                ref = st.reference.numpy()[perm] if perm is not None else st.reference.numpy()
                err = back.astype(np.float64) - ref
                rms = float(np.sqrt((err**2).mean()))
                report.tensors.append(TensorReport(
                    t.name, hf, st.bits, choice.qtype, choice.exact, int(np.prod(st.shape)), int(raw.nbytes),
                    rms, float(np.abs(err).max()), rms / max(float(np.sqrt((ref.astype(np.float64)**2).mean())), 1e-30),
                    choice.note))
                types_used[choice.qtype] = types_used.get(choice.qtype, 0) + int(raw.nbytes)
            elif hf in plain:
                ours = plain[hf].numpy()
                perm = perm_for(t.name, ours.shape[0]) if ours.ndim >= 1 else None
                if perm is not None:
                    ours = ours[perm]
                tpl = dequantize(t.data, t.tensor_type).reshape(ours.shape) if \
                    int(np.prod(t.shape)) == ours.size else None
                if tpl is not None and _close_to_template(tpl, ours):
                    writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
                    report.copied += 1
                else:
                    if tpl is None:
                        raise ExportError(f"template tensor {t.name} has shape {shape} but the checkpoint's {hf} is "
                                          f"{tuple(ours.shape)}: the template is of another model.")
                    writer.add_tensor(t.name, np.ascontiguousarray(ours, dtype=np.float32))
                    report.rewritten.append(t.name)
            else:
                writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)  # e.g. rope tables: not in the model
                report.copied += 1
        for g, hf in extra.items():
            writer.add_tensor(g, np.ascontiguousarray(plain[hf].numpy(), dtype=np.float32))
            report.rewritten.append(g)
        main = max(types_used, key=types_used.get)
        writer.add_file_type(int(gguf.LlamaFileType[FILE_TYPE.get(main, "ALL_F32" if main == "F32" else "MOSTLY_F16")]))
        writer.add_string("matquant.export", json.dumps(metadata or {}, sort_keys=True))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    report.file_bytes = os.path.getsize(out)
    return report


def _is_output_head(model, hf: str) -> bool:
    """Whether plain tensor `hf` is the model's output head (lm_head.weight)."""
    out = model.get_output_embeddings()
    return hf in {f"{n}.weight" for n, m in model.named_modules() if m is out}


def read_tensor_types(path) -> dict[str, str]:
    """{tensor name: GGML type name} of a GGUF file (to count what really was written)."""
    import gguf

    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
