"""Export a slice (or a Mix'n'Match bits map) of a matquant checkpoint as ONE GGUF file for llama.cpp.

Metadata, tokenizer and every tensor we do not quantize come from a *template* GGUF of the same model (the
embedded model's own shipped GGUF by default; for other models one written by llama.cpp's convert_hf_to_gguf.py;
checked and named by `gguf_template`). Each quantized module is written with its own GGML type (`gguf_tensors`; a
bits map gives per-tensor types in one file); the weight error of every tensor is measured by reading the bytes back
with gguf-py's dequantizer.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import dequantize

from matquant.format.atomic import atomic_file
from matquant.integrations.export_slices import ExportError, check_out_path, model_slices, plain_tensors
from matquant.integrations.gguf_template import (arch_permutes_qk, check_template, default_template,
                                                 gguf_tensor_names, llama_row_permutation)
from matquant.integrations.gguf_tensors import TensorChoice, choose_type, encode_slice
from matquant.nn.rotation import online_rotation_refusal

FILE_TYPE = {"Q4_1": "MOSTLY_Q4_1", "Q5_1": "MOSTLY_Q5_1", "Q8_0": "MOSTLY_Q8_0", "Q6_K": "MOSTLY_Q6_K",
             "Q3_K": "MOSTLY_Q3_K_M", "Q2_K": "MOSTLY_Q2_K"}


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
    if (why := online_rotation_refusal(model, "llama.cpp (GGUF)")) is not None:
        raise ExportError(why)
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
    to_gguf = gguf_tensor_names(arch, cfg.num_hidden_layers)
    permute = arch_permutes_qk(arch)

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
                ref = st.reference.numpy()[perm] if perm is not None else st.reference.numpy()
                raw = encode_slice(st, choice.qtype, perm) if dense is None else \
                    np.ascontiguousarray(ref, dtype=np.float32 if dense == "F32" else np.float16)
                writer.add_tensor(t.name, raw, raw_dtype=qtype)
                back = dequantize(raw, qtype).reshape(st.shape)
                err = back.astype(np.float64) - ref
                rms = float(np.sqrt((err**2).mean()))
                report.tensors.append(TensorReport(
                    t.name, hf, st.bits, choice.qtype, choice.exact, int(np.prod(st.shape)), int(raw.nbytes),
                    rms, float(np.abs(err).max()), rms / max(float(np.sqrt((ref.astype(np.float64)**2).mean())), 1e-30),
                    choice.note))
                types_used[choice.qtype] = types_used.get(choice.qtype, 0) + int(raw.nbytes)
                continue
            if hf in plain:
                ours = plain[hf].numpy()
                perm = perm_for(t.name, ours.shape[0]) if ours.ndim >= 1 else None
                if perm is not None:
                    ours = ours[perm]
                if int(np.prod(t.shape)) != ours.size:
                    raise ExportError(f"template tensor {t.name} has shape {shape} but the checkpoint's {hf} is "
                                      f"{tuple(ours.shape)}: the template is of another model.")
                if not _close_to_template(dequantize(t.data, t.tensor_type).reshape(ours.shape), ours):
                    writer.add_tensor(t.name, np.ascontiguousarray(ours, dtype=np.float32))
                    report.rewritten.append(t.name)
                    continue
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)  # as ours, or not in the model (rope tables)
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
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
