"""Export a slice (or a Mix'n'Match bits map) as a compressed-tensors `pack-quantized` folder (what llm-compressor
writes and vLLM serves): group-wise, asymmetric, integer zero points, codes packed into int32 by the
compressed-tensors package's own compressor, `quantization_config` written by its own ModelCompressor.
A module whose slice already lies on the integer-zero grid (checkpoints quantized with zero_points='integer', at the
int8 master and an int4 slice with its own pair) is written exactly as it is; any other is fitted by
`compressed_tensors_fit`; each module's compressed tensors (what
the file holds) are decompressed with compressed-tensors' own decompressor to measure the weight error.

Streaming: the model is read one module at a time (an export source, `export_slices.CheckpointSource`), and each
module's tensors are compressed and written (format/shards.py ShardWriter) before the next is read; the dense model
exists only as a meta-device skeleton that gives the names, dtypes and config files.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM

from matquant.format.atomic import atomic_dir
from matquant.format.checkpoint import tied_keys
from matquant.integrations.compressed_tensors_fit import ZERO_FITS, integer_zero_fit
from matquant.integrations.export_slices import ExportError, SliceLayout, SliceTensor, as_source, check_out_path
from matquant.nn.memory import release_freed_memory
from matquant.nn.rotation import online_rotation_refusal


@dataclass
class ModuleReport:
    module: str
    bits: int
    exact_groups: float      # fraction of groups whose integer zero point is exact
    rms_error: float         # vs matquant's slice (decompressed by compressed-tensors)
    max_error: float
    rel_rms_error: float


PACKED_PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")  # one module's tensors
# vLLM fuses these projections into one layer whose shards must share one scheme (same bits and group size)
FUSED_SHARDS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def unfusable_shards(slices: dict[str, SliceTensor | SliceLayout]) -> list[str]:
    """Layers where a bits map gives the shards vLLM fuses (q/k/v, gate/up) different bits: vLLM refuses them."""
    bad = []
    for name in slices:
        parent, _, leaf = name.rpartition(".")
        for group in FUSED_SHARDS:
            if leaf == group[0]:
                bits = {slices[f"{parent}.{x}"].bits for x in group if f"{parent}.{x}" in slices}
                if len(bits) > 1:
                    bad.append(f"{parent}.{{{','.join(group)}}}")
    return bad


@dataclass
class CTExportReport:
    path: Path
    modules: list[ModuleReport] = field(default_factory=list)
    config_groups: int = 0
    weight_bytes: int = 0
    unfusable: list[str] = field(default_factory=list)
    bits_per_weight: float = 0.0  # packed codes + scales + zero points of the quantized modules, from the file

    def summary(self) -> str:
        exact = sum(m.exact_groups == 1.0 for m in self.modules)
        worst = max(self.modules, key=lambda m: m.rel_rms_error)
        hint = "" if exact == len(self.modules) else (
            "; exact are the int8 slice and, with --slice-params own, the int4 slice of a checkpoint quantized "
            "with --zero-points integer")
        return (f"wrote {self.path}: pack-quantized, {self.config_groups} config group(s), {len(self.modules)} "
                f"modules ({exact} exact: the slice itself, written without a fit; {len(self.modules) - exact} "
                f"nearest-fitted integer zero points{hint}), "
                f"{self.bits_per_weight:.3f} bits/weight over the quantized modules\n"
                f"  weight error vs the slice: worst relative rms {worst.rel_rms_error:.2e} ({worst.module}), "
                f"worst max abs {max(m.max_error for m in self.modules):.2e}; model.safetensors "
                f"{self.weight_bytes / 2**20:.1f} MiB" + (
                    f"\n  warning: vLLM fuses q/k/v and gate/up and needs one scheme per fused layer; the bits map "
                    f"splits {len(self.unfusable)} of them (e.g. {self.unfusable[0]}): transformers loads this folder, "
                    "vLLM will refuse it" if self.unfusable else ""))


def _config_groups(slices: dict[str, SliceTensor | SliceLayout]) -> dict[str, dict]:
    """One config group per (bits, group size), targets = exact module names (a bits map -> several groups)."""
    groups: dict[tuple[int, int], list[str]] = {}
    for name, st in slices.items():
        groups.setdefault((st.bits, st.group_size), []).append(name)
    out = {}
    for i, ((bits, gs), names) in enumerate(sorted(groups.items(), reverse=True)):
        out[f"group_{i}"] = {
            "targets": names,
            "weights": {"num_bits": bits, "type": "int", "symmetric": False, "strategy": "group",
                        "group_size": gs, "dynamic": False, "actorder": None, "observer": "minmax"},
            "input_activations": None, "output_activations": None, "format": "pack-quantized",
        }
    return out


def export_compressed_tensors(model, tokenizer, out, dtype: torch.dtype = torch.float16, pack_bits: int | None = None,
                              overwrite: bool = False, fit: str = "search",
                              max_shard_bytes: int | None = None) -> CTExportReport:
    """Write the current slice (per-module bits) of `model` (a model in memory, or an export source such as
    `CheckpointSource`: read one tensor at a time) as a compressed-tensors pack-quantized HF folder, one module at a
    time: fit (`compressed_tensors_fit`), compress with compressed-tensors' own PackedQuantizationCompressor, write
    through ShardWriter (`max_shard_bytes`: HF shards of at most that size; None: sharded like a sharded checkpoint
    source, else one model.safetensors), measure against the slice by that compressor's own decompress.
    `fit`: how the integer-zero grid is fitted where it cannot hold the slice exactly (ZERO_FITS)."""
    from matquant.format.export import plain_model_skeleton, save_plain_config
    from matquant.format.shards import ShardWriter

    src = as_source(model, tokenizer)
    if (why := online_rotation_refusal(src.model, "a compressed-tensors engine (vLLM)")) is not None:
        raise ExportError(why)
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
        from compressed_tensors.quantization import (QuantizationConfig, QuantizationStatus,
                                                     apply_quantization_config)
    except ImportError:
        raise ImportError("compressed-tensors export needs the compressed-tensors package: "
                          "pip install 'matquant[export]'") from None
    check_out_path(out, overwrite)
    if src.tokenizer is None:
        raise ExportError("the exported folder needs a tokenizer; the checkpoint has none.")
    layouts = {n: src.layout(n) for n in src.slice_names}
    bad = [n for n, st in layouts.items() if st.shape[1] % st.group_size]
    if bad:
        raise ExportError(f"{bad[0]}: input width {layouts[bad[0]].shape[1]} is not a multiple of the group size.")
    if fit not in ZERO_FITS:
        raise ExportError(f"unknown zero-point fit {fit!r}; choose one of {', '.join(ZERO_FITS)}.")
    for st in layouts.values():  # refuse what no grid holds before anything is written
        big = max(st.bits, pack_bits or st.bits)
        if big > 8 or st.levels > 2**big:
            raise ExportError(f"{st.module}: '{st.mode}' slicing at {st.bits} bits has {st.levels} levels; a {big}-bit "
                              f"compressed-tensors grid holds 2^{big}. Use --slicing nested/paper or a larger "
                              "--pack-bits.")
    stored = {n: replace(st, bits=max(st.bits, pack_bits)) for n, st in layouts.items()} if pack_bits else layouts

    plain = plain_model_skeleton(src.config, dtype)  # meta: names, dtypes, the scheme of each module, no memory
    qcfg = QuantizationConfig.model_validate({
        "config_groups": _config_groups(stored), "format": "pack-quantized", "quant_method": "compressed-tensors",
        "quantization_status": "initialized", "ignore": ["lm_head"], "kv_cache_scheme": None,
        "global_compression_ratio": None})
    apply_quantization_config(plain, qcfg)
    compressor = ModelCompressor.from_pretrained_model(plain, quantization_format="pack-quantized")
    compressor.quantization_config.quantization_status = QuantizationStatus.COMPRESSED
    report = CTExportReport(Path(out), config_groups=len(qcfg.config_groups), unfusable=unfusable_shards(stored))
    target = plain.state_dict()
    tied = tied_keys(plain)
    if max_shard_bytes is None:
        max_shard_bytes = src.out_shard_bytes()
    qbytes = qnum = 0
    with atomic_dir(out, overwrite=overwrite) as tmp:
        save_plain_config(plain, tmp, dtype)
        compressor.update_config(str(tmp))
        writer = ShardWriter(tmp, max_shard_bytes or 2**62, metadata={"format": "pt"})
        try:
            for k in target:
                owner, _, leaf = k.rpartition(".")
                if owner in layouts:
                    if leaf == "weight":  # the module's compressed tensors, all at once
                        parts, ref = _compress_module(src, owner, plain.get_submodule(owner), dtype, pack_bits, fit,
                                                      PackedQuantizationCompressor, report)
                        for name, t in parts.items():  # (standard strides: a [rows, 1] scale may have others)
                            writer.add(f"{owner}.{name}", torch.empty(t.shape, dtype=t.dtype).copy_(t))
                        qbytes += sum(parts[x].nbytes for x in ("weight_packed", "weight_scale", "weight_zero_point"))
                        qnum += ref
                        del parts
                        release_freed_memory()
                    if leaf != "bias":
                        continue
                if k in tied:
                    continue  # stored once, as transformers' save_pretrained does
                v = src.plain(k)
                writer.add(k, v.to(dtype).to(target[k].dtype) if v.is_floating_point() else v)
                del v
            writer.close()
        except BaseException:
            writer.abort()
            raise
        src.tokenizer.save_pretrained(tmp)
        _record(tmp, stored)
        report.weight_bytes = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))
    report.bits_per_weight = 8 * qbytes / max(qnum, 1)
    return report


def _compress_module(src, name: str, module, dtype, pack_bits, fit, compressor, report: CTExportReport):
    """(compressed tensors {weight_packed, weight_scale, weight_zero_point, weight_shape}, weights count) of one
    module: its slice read, fitted onto the integer-zero grid, compressed by compressed-tensors, decompressed again
    to measure the error (recorded in `report`)."""
    st = src.slice(name)
    scale, zp, q, exact = integer_zero_fit(st, dtype, pack_bits, fit)
    if pack_bits:
        st = replace(st, bits=max(st.bits, pack_bits))
    scheme = module.quantization_scheme
    scale = scale.to(module.weight_scale.dtype)
    zp = zp.to(module.weight_zero_point.dtype)
    # the dense weight ON the fitted grid, so the compressor's own quantize() recovers exactly q
    w = scale.to(torch.float64).repeat_interleave(st.group_size, 1) * (
        q.double() - zp.double().repeat_interleave(st.group_size, 1))
    parts = compressor.compress({"weight": w.to(module.weight.dtype), "weight_scale": scale,
                                 "weight_zero_point": zp}, scheme)
    back = compressor.decompress(dict(parts), scheme)["weight"].double()
    ref = st.reference.double()
    err = back - ref
    rms = float(err.pow(2).mean().sqrt())
    report.modules.append(ModuleReport(name, st.bits, float(exact.float().mean()), rms, float(err.abs().max()),
                                       rms / max(float(ref.pow(2).mean().sqrt()), 1e-30)))
    return {k: v for k, v in parts.items() if k.startswith("weight_")}, st.reference.numel()


def _record(folder: Path, slices: dict[str, SliceTensor | SliceLayout]) -> None:
    """What was exported, next to the model (config.json stays exactly as compressed-tensors writes it)."""
    info = {"bits": {n: st.bits for n, st in slices.items()}, "slicing": sorted({st.mode for st in slices.values()})}
    (Path(folder) / "matquant_export.json").write_text(json.dumps(info, indent=1) + "\n")


def _schemes_and_tensors(folder) -> tuple[dict, dict]:
    """({module: its config group's QuantizationScheme}, {tensor name: tensor}) of a pack-quantized folder."""
    from compressed_tensors.quantization import QuantizationScheme

    cfg = json.loads((Path(folder) / "config.json").read_text())["quantization_config"]
    schemes = {t: QuantizationScheme(targets=[t], weights=g["weights"])
               for g in cfg["config_groups"].values() for t in g["targets"]}
    tensors = {}
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            tensors.update({k: h.get_tensor(k) for k in h.keys()})
    return schemes, tensors


def _decompressed_weight(tensors: dict, module: str, scheme) -> torch.Tensor:
    """One module's dense weight, decompressed by compressed-tensors' PackedQuantizationCompressor."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    parts = {k: tensors[f"{module}.{k}"] for k in PACKED_PARTS}
    return PackedQuantizationCompressor.decompress(parts, scheme)["weight"]


def load_decompressed(folder, dtype: torch.dtype = torch.float32):
    """The exported folder as a dense transformers model, every module decompressed by compressed-tensors'
    PackedQuantizationCompressor with ITS OWN config group's scheme.

    Needed for bits maps (several config groups): transformers 5.24's `CompressedTensorsConfig(dequantize=True)`
    decompresses dense layers with one config group's scheme (`get_dense_scheme`), so a folder mixing e.g. 4- and
    2-bit groups fails to load there ("size of tensor a (3) must match ... b (4)"); a single-group folder loads fine
    through transformers directly."""
    schemes, tensors = _schemes_and_tensors(folder)
    cfg = json.loads((Path(folder) / "config.json").read_text())
    cfg.pop("quantization_config")
    hf_cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    sd = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[-1] not in PACKED_PARTS}
    for name, scheme in schemes.items():
        sd[f"{name}.weight"] = _decompressed_weight(tensors, name, scheme)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise ExportError(f"{folder}: tensors do not match the model (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]})")
    model.tie_weights()
    return model.eval()
