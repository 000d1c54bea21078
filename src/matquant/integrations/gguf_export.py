"""Export a slice (or a Mix'n'Match bits map) of a matquant checkpoint as ONE GGUF file for llama.cpp, streaming:
the checkpoint is read one tensor at a time and each tensor is encoded and written before the next is read, so the
memory held is about one tensor (plus the writer's metadata), whatever the depth of the model.

Metadata and tokenizer come from either
- a *template* GGUF of the same model (`--template`; the embedded model's own shipped GGUF by default when the
  checkpoint is of that model; checked and named by `gguf_template`): its metadata, tokenizer and every tensor we do
  not quantize are reused, in the template's tensor order; or
- the checkpoint's own HF config and tokenizer (`gguf_metadata`, llama.cpp's conversion conventions) when there is
  no template (a model that came from an HF folder; `--template none` forces it): tensors in the checkpoint's order,
  the non-quantized ones written from the checkpoint (F32 for vectors, F16 for matrices).

Plain tensors are compared with the template and written as llama.cpp's converter stores them: Gemma's RMSNorm
weights as 1 + w (`gguf_template.norm_offset`).

Each quantized module is written with its own GGML type (`gguf_tensors`; a bits map gives per-tensor types in one
file); the weight error of every tensor is measured by reading the bytes back with gguf-py's dequantizer.

How the writer streams: gguf-py's GGUFWriter takes every tensor's name, shape and type first (`add_tensor_info`, a
plan made from the skeleton without reading codes), writes the header, metadata and tensor infos, then takes the
tensors' bytes one by one in the same order (`write_tensor_data`).
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
from matquant.integrations.export_slices import ExportError, as_source, check_out_path
from matquant.nn.memory import release_freed_memory
from matquant.integrations.gguf_template import (arch_permutes_qk, check_template, could_be_template_of,
                                                 default_template, gguf_arch, gguf_tensor_names,
                                                 llama_row_permutation, norm_offset)
from matquant.integrations.gguf_tensors import TensorChoice, choose_type, encode_slice
from matquant.nn.rotation import online_rotation_refusal

FILE_TYPE = {"Q4_1": "MOSTLY_Q4_1", "Q5_1": "MOSTLY_Q5_1", "Q8_0": "MOSTLY_Q8_0", "Q6_K": "MOSTLY_Q6_K",
             "Q3_K": "MOSTLY_Q3_K_M", "Q2_K": "MOSTLY_Q2_K"}
NO_TEMPLATE = "none"  # --template none: metadata and tokenizer from the checkpoint's HF config and tokenizer


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
    template: Path | None = None    # None: metadata and tokenizer written from the HF config and tokenizer
    notes: list[str] = field(default_factory=list)

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
                 f"worst max abs {max(t.max_error for t in self.tensors):.2e}"]
        if self.template is not None:
            lines.append(f"  {self.copied} tensor(s) copied from the template")
            if self.rewritten:
                lines.append(f"  {len(self.rewritten)} non-quantized tensor(s) differ from the template and were "
                             f"written as F32 from the checkpoint, e.g. {self.rewritten[:2]}")
        else:
            lines.append(f"  metadata and tokenizer from the checkpoint's config and tokenizer (no template); "
                         f"{len(self.rewritten)} non-quantized tensor(s) written from the checkpoint")
        notes = sorted({t.note for t in self.tensors if t.note}) + self.notes
        lines += [f"  note: {n}" for n in notes]
        return "\n".join(lines)


@dataclass
class _Planned:
    """One tensor of the file: its GGUF name and type, what it is written from (`kind`), its rows permutation, and
    the constant added to a plain tensor (`offset`: 1 for a Gemma RMSNorm weight, stored as 1 + w)."""
    name: str
    kind: str                        # "slice" (a quantized module), "plain" (a checkpoint tensor), "copy" (template)
    source: str | None               # HF module / tensor name; None for a template-only tensor
    qtype: str                       # GGML type name
    shape: tuple[int, ...]           # numpy order ([rows, cols])
    nbytes: int
    choice: TensorChoice | None = None
    perm: np.ndarray | None = None
    template_index: int | None = None
    offset: float = 0.0


def _close_to_template(t, ours: np.ndarray, rows: int = 4096) -> bool:
    """Does the template tensor `t` (any GGML type) hold `ours` to 1e-3 of its largest magnitude? Dequantized and
    compared a block of rows at a time: no full-size copies of a large embedding."""
    if int(np.prod(t.shape)) != ours.size:
        return False
    mat = ours.reshape(-1, ours.shape[-1]) if ours.ndim else ours.reshape(1, 1)
    data = t.data.reshape(mat.shape[0], -1)  # rows of elements (F32/F16) or of block bytes (quantized)
    scale = max((float(np.abs(mat[i:i + rows]).max()) for i in range(0, mat.shape[0], rows)), default=0.0) or 1.0
    for i in range(0, mat.shape[0], rows):
        tpl = dequantize(data[i:i + rows], t.tensor_type).reshape(mat[i:i + rows].shape)
        if float(np.abs(tpl.astype(np.float32) - mat[i:i + rows]).max()) > 1e-3 * scale:
            return False
    return True


def _nbytes(shape: tuple[int, ...], qtype: str) -> int:
    t = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[t]
    return int(np.prod(shape[:-1], dtype=np.int64)) * shape[-1] // block * size


def _resolve_template(template, src):
    """(template path or None, its GGUFReader or None, the GGUF architecture)."""
    if template is not None and str(template).lower() == NO_TEMPLATE:
        return None, None, gguf_arch(src.config)
    explicit = template is not None
    path = Path(template) if explicit else default_template()
    if explicit and not path.is_file():
        raise FileNotFoundError(f"template GGUF {path} does not exist.")
    if not explicit and not (path.is_file() and could_be_template_of(path, src.config)):
        return None, None, gguf_arch(src.config)  # the default template is of another model: write our own
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise ExportError(f"template {path} is not a readable GGUF file ({e}).") from None
    try:
        arch = check_template(reader, src.config, src.tokenizer, path)
    except ExportError:
        if explicit:
            raise
        return None, None, gguf_arch(src.config)  # the default template is of another model: write our own
    return path, reader, arch


def export_gguf(model, tokenizer, out, template=None, k_quants: bool = False, overwrite: bool = False,
                metadata: dict | None = None, dense: str | None = None) -> GGUFExportReport:
    """Write the current slice (per-module bits) of `model` (a model in memory, or an export source such as
    `CheckpointSource`: read one tensor at a time) as one GGUF file.

    `template`: a GGUF of the same model supplying metadata, tokenizer and non-quantized tensors; None: the embedded
    model's shipped GGUF when the checkpoint is of that model, else no template; 'none': no template (metadata and
    tokenizer from the HF config and tokenizer, `gguf_metadata`).
    `dense` ('F32' or 'F16'): write the slice's dequantized values instead of GGML blocks (the like-for-like
    reference for llama.cpp's own perplexity tool)."""
    src = as_source(model, tokenizer)
    if (why := online_rotation_refusal(src.model, "llama.cpp (GGUF)")) is not None:
        raise ExportError(why)
    check_out_path(out, overwrite)
    tpl_path, reader, arch = _resolve_template(template, src)
    cfg = src.config
    to_gguf = gguf_tensor_names(arch, cfg.num_hidden_layers)
    permute = arch_permutes_qk(arch)

    def perm_for(gname: str, rows: int):
        if not permute:
            return None
        if ".attn_q." in gname:
            return llama_row_permutation(rows, cfg.num_attention_heads)
        if ".attn_k." in gname:
            return llama_row_permutation(rows, cfg.num_attention_heads, cfg.num_key_value_heads)
        return None

    def slice_entry(g: str, hf: str, expect: tuple | None = None) -> _Planned:
        lay = src.layout(hf)
        if expect is not None and expect != lay.shape:
            raise ExportError(f"template tensor {g} has shape {expect} but the checkpoint's {hf} is {lay.shape}: "
                              "the template is of another model.")
        choice = choose_type(lay, k_quants) if dense is None else TensorChoice(dense, exact=dense == "F32")
        return _Planned(g, "slice", hf, choice.qtype, lay.shape, _nbytes(lay.shape, choice.qtype), choice,
                        perm_for(g, lay.shape[0]))

    offset_for = lambda hf: norm_offset(arch, hf)  # noqa: E731 - Gemma norms: 1 + w, as llama.cpp's converter
    plan = (_plan_with_template(reader, src, to_gguf, perm_for, slice_entry, tpl_path, offset_for)
            if reader is not None else _plan_without_template(src, to_gguf, perm_for, slice_entry, offset_for))
    report = GGUFExportReport(Path(out), template=tpl_path)
    types_used: dict[str, int] = {}
    for p in plan:
        if p.kind == "slice":
            types_used[p.qtype] = types_used.get(p.qtype, 0) + p.nbytes
    with atomic_file(check_out_path(Path(out), overwrite)) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        if reader is not None:
            for f in reader.fields.values():
                if f.name.startswith("GGUF.") or f.name in ("general.architecture", "general.file_type"):
                    continue
                vtype = f.types[0]
                sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
        else:
            from matquant.integrations.gguf_metadata import add_hf_metadata

            report.notes += add_hf_metadata(writer, arch, cfg, src.tokenizer, src.ckpt_dir)
        main = max(types_used, key=types_used.get) if types_used else "F32"
        writer.add_file_type(int(gguf.LlamaFileType[FILE_TYPE.get(main, "ALL_F32" if main == "F32" else "MOSTLY_F16")]))
        writer.add_string("matquant.export", json.dumps(metadata or {}, sort_keys=True))
        for p in plan:
            ggml = gguf.GGMLQuantizationType[p.qtype]
            if ggml in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32 if p.qtype == "F32" else np.float16),
                                       p.nbytes)
            else:
                writer.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=ggml)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in plan:
            raw = _tensor_bytes(p, src, reader, dense, report)
            if raw.nbytes != p.nbytes:  # pragma: no cover - the plan and the encoders disagree: a bug, not input
                raise ExportError(f"{p.name}: planned {p.nbytes} bytes but encoded {raw.nbytes}.")
            writer.write_tensor_data(raw)
            del raw
            release_freed_memory()
        writer.close()
    report.file_bytes = os.path.getsize(out)
    return report


def _plan_with_template(reader, src, to_gguf, perm_for, slice_entry, tpl_path, offset_for) -> list[_Planned]:
    """Every template tensor in its order: ours where the checkpoint has it (quantized, or plain and different
    from the template's, compared as the GGUF stores it: + `offset_for(name)`), else copied; then an untied output
    head the template lacks."""
    tpl_names = {t.name for t in reader.tensors}
    hf_of: dict[str, str] = {}
    extra: dict[str, str] = {}  # GGUF name -> plain tensor the template lacks: an untied output head
    slices, plain = set(src.slice_names), set(src.plain_names)
    for hf in list(src.slice_names) + list(src.plain_names):
        key = hf if hf in plain else f"{hf}.weight"
        g = to_gguf(key)
        if g is None or g not in tpl_names:
            if hf in plain and hf == src.output_head:
                if getattr(src.config, "tie_word_embeddings", False):
                    continue  # tied: the template (like llama.cpp's output) stores no separate output tensor
                if g is not None:
                    extra[g] = hf  # e.g. rotate='residual' unties lm_head; llama.cpp reads output.weight when present
                    continue
            raise ExportError(f"template {tpl_path} has no tensor for the checkpoint's {key} (GGUF name {g}); "
                              "the template is of another model. Pass --template made from the checkpoint's source.")
        hf_of[g] = hf
    plan = []
    for i, t in enumerate(reader.tensors):
        hf = hf_of.get(t.name)
        shape = tuple(int(x) for x in reversed(t.shape))  # numpy order: [rows (out), cols (in)]
        if hf in slices:
            plan.append(slice_entry(t.name, hf, shape))
            continue
        if hf in plain:
            offset = offset_for(hf)
            ours = src.plain(hf).numpy() + np.float32(offset) if offset else src.plain(hf).numpy()
            perm = perm_for(t.name, ours.shape[0]) if ours.ndim >= 1 else None
            if perm is not None:
                ours = ours[perm]
            if int(np.prod(t.shape)) != ours.size:
                raise ExportError(f"template tensor {t.name} has shape {shape} but the checkpoint's {hf} is "
                                  f"{tuple(ours.shape)}: the template is of another model.")
            if not _close_to_template(t, ours):
                plan.append(_Planned(t.name, "plain", hf, "F32", tuple(ours.shape), ours.size * 4, perm=perm,
                                     offset=offset))
                continue
        plan.append(_Planned(t.name, "copy", None, t.tensor_type.name, shape, int(t.data.nbytes), template_index=i))
    for g, hf in extra.items():
        shape = tuple(src.model.state_dict()[hf].shape)
        plan.append(_Planned(g, "plain", hf, "F32", shape, int(np.prod(shape)) * 4, offset=offset_for(hf)))
    return plan


def _plan_without_template(src, to_gguf, perm_for, slice_entry, offset_for) -> list[_Planned]:
    """Every checkpoint tensor in state-dict order under its GGUF name: quantized ones as chosen, plain ones F32
    (vectors: norms, biases) or F16 (matrices: embedding, untied head) plus `offset_for(name)`, as llama.cpp's
    converter writes them."""
    plan = []
    slices, plain = set(src.slice_names), set(src.plain_names)
    tied = getattr(src.config, "tie_word_embeddings", False)
    state = src.model.state_dict()  # the skeleton's names and shapes (meta tensors for a checkpoint)
    for hf in state:
        owner, _, leaf = hf.rpartition(".")
        if owner in slices:
            if leaf == "qweight":
                g = to_gguf(f"{owner}.weight")
                if g is None:
                    raise ExportError(f"gguf-py has no GGUF name for the checkpoint's {owner}.weight in this "
                                      "architecture; pass --template with a GGUF of the model.")
                plan.append(slice_entry(g, owner))
            if leaf in ("qweight", "scales", "zeros") or leaf.startswith(("scales_int", "zeros_int")):
                continue
        if hf not in plain:
            continue
        if hf == src.output_head and tied:
            continue  # llama.cpp reads the tied head from token_embd
        g = to_gguf(hf)
        if g is None:
            if hf.endswith("rotary_emb.inv_freq"):
                continue
            raise ExportError(f"gguf-py has no GGUF name for the checkpoint's {hf} in this architecture; pass "
                              "--template with a GGUF of the model.")
        shape = tuple(state[hf].shape)
        qtype = "F32" if len(shape) == 1 else "F16"
        plan.append(_Planned(g, "plain", hf, qtype, shape, int(np.prod(shape)) * (4 if qtype == "F32" else 2),
                             perm=perm_for(g, shape[0]), offset=offset_for(hf)))
    return plan


def _tensor_bytes(p: _Planned, src, reader, dense, report: GGUFExportReport) -> np.ndarray:
    """The bytes of one planned tensor (read from the source or the template just now), its report recorded."""
    if p.kind == "copy":
        report.copied += 1
        return reader.tensors[p.template_index].data
    if p.kind == "plain":
        ours = src.plain(p.source).numpy()
        if p.offset:
            ours = ours + np.float32(p.offset)
        if p.perm is not None:
            ours = ours[p.perm]
        report.rewritten.append(p.name)
        return np.ascontiguousarray(ours, dtype=np.float32 if p.qtype == "F32" else np.float16)
    st = src.slice(p.source)
    ref = st.reference.numpy()[p.perm] if p.perm is not None else st.reference.numpy()
    qtype = gguf.GGMLQuantizationType[p.qtype]
    raw = encode_slice(st, p.qtype, p.perm) if dense is None else \
        np.ascontiguousarray(ref, dtype=np.float32 if dense == "F32" else np.float16)
    rms, max_err, ref_rms = _error_stats(raw, qtype, ref)
    report.tensors.append(TensorReport(
        p.name, p.source, st.bits, p.qtype, p.choice.exact, int(np.prod(st.shape)), int(raw.nbytes), rms, max_err,
        rms / max(ref_rms, 1e-30), p.choice.note))
    return raw


def _error_stats(raw: np.ndarray, qtype, ref: np.ndarray, rows: int = 512) -> tuple[float, float, float]:
    """(rms error, max abs error, rms of ref) of the bytes read back with gguf-py's dequantizer against the slice,
    a block of rows at a time (float64 sums; no full-size float64 copies of a 7B tensor)."""
    sq = ref_sq = 0.0
    big = 0.0
    for i in range(0, ref.shape[0], rows):
        back = dequantize(raw[i:i + rows], qtype).reshape(ref[i:i + rows].shape)
        err = back.astype(np.float64) - ref[i:i + rows]
        sq += float((err**2).sum())
        ref_sq += float((ref[i:i + rows].astype(np.float64) ** 2).sum())
        big = max(big, float(np.abs(err).max()) if err.size else 0.0)
    n = max(ref.size, 1)
    return float(np.sqrt(sq / n)), big, float(np.sqrt(ref_sq / n))


def read_tensor_types(path) -> dict[str, str]:
    """{tensor name: GGML type name} of a GGUF file (to count what really was written)."""
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
