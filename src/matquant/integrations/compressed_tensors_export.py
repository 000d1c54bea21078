"""Export a slice (or a Mix'n'Match bits map) as a compressed-tensors `pack-quantized` folder (what llm-compressor
writes and vLLM serves): group-wise, asymmetric, integer zero points, codes packed into int32 by the
compressed-tensors package's own compressor, `quantization_config` written by its own ModelCompressor.

compressed-tensors dequantizes W = scale · (q − zp) with q, zp signed r-bit integers (q in −2^(r−1)..2^(r−1)−1).
Our slice is W = A · (q_r + B/A), so it is exactly representable iff zp = −2^(r−1) − B/A is an integer (and in
range) for every group: always for r = master bits with integer zeros (RTN/GPTQ MinMax), otherwise only where
(z − c)/2^s happens to be an integer. Elsewhere we fit, per group, the integer-zero grid nearest to OUR slice values
(scale searched around A, zp the two integers around the fractional one, codes re-rounded) and report the error.
`fit="lsq"` adds a least-squares refit of scale and codes (lower weight rms, measured worse perplexity).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from matquant.integrations.export_slices import ExportError, SliceTensor, check_out_path, model_slices

SCALE_STEPS = 5  # candidate scales A·(1 + t), t in {−½, −¼, 0, ¼, ½}/(2^r − 1) (17 steps: same error to 1e-4, 3x slower)
# how the integer-zero grid is fitted to the slice values: "search" (default) = best of the candidate grids above;
# "lsq" = then per group and zero point zp + {−1, 0, 1}: alternate the least-squares scale for the codes and
# re-rounding the codes (LSQ_ITERS rounds), keeping a change only where the squared error drops. Lower weight rms,
# measured worse perplexity (see _lsq_refit; docs/export.md)
ZERO_FITS = ("search", "lsq")
LSQ_ITERS = 3


def _rows(x: torch.Tensor, g: int) -> torch.Tensor:
    """[rows, cols] -> [rows, n_groups, g]."""
    return x.reshape(x.shape[0], -1, g)


def _lsq_refit(v: torch.Tensor, s: torch.Tensor, z: torch.Tensor, err: torch.Tensor, lo: int, hi: int,
               scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Improve per-group (s, z) of the grid s·(q − z) on values v [rows, G, g]: for z + {−1, 0, 1}, alternate
    s = Σ v·(q − z) / Σ (q − z)² (rounded to scale_dtype) and q = clamp(round(v/s) + z); a group takes the new
    (s, z) only where its squared error drops below `err`. Returns (s, z, err).

    Measured on SmolLM2 RTN int4 (docs/export.md): weight rms error vs the slice 8.4 % -> 7.5 %, but perplexity
    26.83 -> 27.51: the lower rms comes from clipping each group's largest weights (max abs error 0.49 -> 1.08);
    with the worst error per group held, the rms gain is 0.3 %. Hence not the default."""
    for dz in (0, -1, 1):
        zz = (z + dz).clamp(lo, hi)
        ss = s
        for _ in range(LSQ_ITERS):
            c = torch.clamp(torch.round(v / ss[..., None]) + zz[..., None], lo, hi) - zz[..., None]
            den = (c * c).sum(-1)
            s_new = ((v * c).sum(-1) / den.clamp(min=1e-30)).to(scale_dtype).double()
            ss = torch.where((den > 0) & (s_new != 0) & torch.isfinite(s_new), s_new, ss)
            q = torch.clamp(torch.round(v / ss[..., None]) + zz[..., None], lo, hi)
            e = ((v - ss[..., None] * (q - zz[..., None])) ** 2).sum(-1)
            better = e < err
            err, s, z = torch.where(better, e, err), torch.where(better, ss, s), torch.where(better, zz, z)
    return s, z, err


def integer_zero_fit(st: SliceTensor, scale_dtype: torch.dtype, pack_bits: int | None = None, fit: str = "search"
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(scale [rows, G] in scale_dtype, zp int8 [rows, G], q int8 [rows, cols], exact bool [rows, G]) with
    scale·(q − zp) the compressed-tensors grid nearest to the slice; `exact` where it equals the slice's own.

    `pack_bits` R >= r stores the r-bit slice in R-bit codes: the grid step becomes A/n, n = (2^R − 1) // (2^r − 1)
    (our 2^r levels are every n-th of the 2^R), so the integer-zero offset error shrinks n-fold (2-bit in 4-bit
    codes: n = 5; in 8-bit: n = 85). `fit` is one of ZERO_FITS."""
    if fit not in ZERO_FITS:
        raise ExportError(f"unknown zero-point fit {fit!r}; choose one of {', '.join(ZERO_FITS)}.")
    r = st.bits
    big = max(r, pack_bits or r)
    if big > 8:
        raise ExportError(f"{st.module}: compressed-tensors packs 1..8-bit codes, not {big}.")
    if st.levels > 2**big:
        raise ExportError(f"{st.module}: '{st.mode}' slicing at {r} bits has {st.levels} levels; a {big}-bit "
                          "compressed-tensors grid holds 2^{big}. Use --slicing nested/paper or a larger --pack-bits.")
    n = (2**big - 1) // max(st.levels - 1, 1)
    lo, hi = -(2 ** (big - 1)), 2 ** (big - 1) - 1
    g = st.group_size
    v = _rows(st.reference.double(), g)
    a, b = st.a.double() / n, st.b.double()
    r = big
    zp_frac = lo - b / torch.where(a == 0, torch.ones_like(a), a)
    exact = ((zp_frac - torch.round(zp_frac)).abs() < 1e-6) & (zp_frac.round() >= lo) & (zp_frac.round() <= hi)
    best_err = best_s = best_z = None
    ts = torch.linspace(-0.5, 0.5, SCALE_STEPS, dtype=torch.float64) / (2**r - 1)
    # plus llm-compressor's own min-max grid (range stretched to include 0): the fallback for groups whose zero
    # point lies outside the r-bit code range (all weights of one sign), where no grid near A covers the values
    vmin, vmax = v.amin(-1).clamp(max=0), v.amax(-1).clamp(min=0)
    s_mm = (vmax - vmin) / (2**r - 1)
    cands = [(a * (1 + t), (torch.floor(zp_frac), torch.ceil(zp_frac))) for t in [torch.zeros((), dtype=torch.float64), *ts]]
    cands.append((s_mm, (lo - torch.round(vmin / torch.where(s_mm == 0, torch.ones_like(s_mm), s_mm)),)))
    for s_raw, zs in cands:
        s = s_raw.to(scale_dtype).double()
        s = torch.where(s == 0, torch.ones_like(s), s)
        for z in zs:
            z = z.clamp(lo, hi)
            q = torch.clamp(torch.round(v / s[..., None]) + z[..., None], lo, hi)
            err = ((v - s[..., None] * (q - z[..., None])) ** 2).sum(-1)
            if best_err is None:
                best_err, best_s, best_z = err, s, z
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    if fit == "lsq":
        best_s, best_z, best_err = _lsq_refit(v, best_s, best_z, best_err, lo, hi, scale_dtype)
    q = torch.clamp(torch.round(v / best_s[..., None]) + best_z[..., None], lo, hi)
    return (best_s.to(scale_dtype), best_z.to(torch.int8), q.reshape(st.shape).to(torch.int8), exact)


@dataclass
class ModuleReport:
    module: str
    bits: int
    exact_groups: float      # fraction of groups whose integer zero point is exact
    rms_error: float         # vs matquant's slice (decompressed by compressed-tensors)
    max_error: float
    rel_rms_error: float


# vLLM fuses these projections into one layer whose shards must share one scheme (same bits and group size)
FUSED_SHARDS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def unfusable_shards(slices: dict[str, SliceTensor]) -> list[str]:
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
        return (f"wrote {self.path}: pack-quantized, {self.config_groups} config group(s), {len(self.modules)} "
                f"modules ({exact} exact, {len(self.modules) - exact} nearest-fitted integer zero points), "
                f"{self.bits_per_weight:.3f} bits/weight over the quantized modules\n"
                f"  weight error vs the slice: worst relative rms {worst.rel_rms_error:.2e} ({worst.module}), "
                f"worst max abs {max(m.max_error for m in self.modules):.2e}; model.safetensors "
                f"{self.weight_bytes / 2**20:.1f} MiB" + (
                    f"\n  warning: vLLM fuses q/k/v and gate/up and needs one scheme per fused layer; the bits map "
                    f"splits {len(self.unfusable)} of them (e.g. {self.unfusable[0]}): transformers loads this folder, "
                    "vLLM will refuse it" if self.unfusable else ""))


def _config_groups(slices: dict[str, SliceTensor]) -> dict[str, dict]:
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
                              overwrite: bool = False, fit: str = "search") -> CTExportReport:
    """Write the model's current slice (per-module bits) as a compressed-tensors pack-quantized HF folder.
    `fit`: how the integer-zero grid is fitted where it cannot hold the slice exactly (ZERO_FITS)."""
    from matquant.nn.rotation import online_rotation_refusal

    if (why := online_rotation_refusal(model, "a compressed-tensors engine (vLLM)")) is not None:
        raise ExportError(why)
    try:
        from compressed_tensors.compressors import ModelCompressor
        from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config
    except ImportError:
        raise ImportError("compressed-tensors export needs the compressed-tensors package: "
                          "pip install 'matquant[export]'") from None
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from matquant.format.atomic import atomic_dir
    from matquant.format.export import plain_state_dict

    check_out_path(out, overwrite)
    if tokenizer is None:
        raise ExportError("the exported folder needs a tokenizer; the checkpoint has none.")
    slices = model_slices(model)
    bad = [n for n, st in slices.items() if st.shape[1] % st.group_size]
    if bad:
        raise ExportError(f"{bad[0]}: input width {slices[bad[0]].shape[1]} is not a multiple of the group size.")
    if fit not in ZERO_FITS:
        raise ExportError(f"unknown zero-point fit {fit!r}; choose one of {', '.join(ZERO_FITS)}.")
    fits = {n: integer_zero_fit(st, dtype, pack_bits, fit) for n, st in slices.items()}
    if pack_bits:
        slices = {n: replace(st, bits=max(st.bits, pack_bits)) for n, st in slices.items()}  # the stored widths

    cfg = model.config.__class__.from_dict({k: v for k, v in model.config.to_dict().items()
                                            if k != "quantization_config"})
    with no_init_weights():
        plain = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in plain_state_dict(model).items()}
    missing, unexpected = plain.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise ExportError(f"model mismatch building the dense model: missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]}")
    plain.tie_weights()
    qcfg = QuantizationConfig.model_validate({
        "config_groups": _config_groups(slices), "format": "pack-quantized", "quant_method": "compressed-tensors",
        "quantization_status": "initialized", "ignore": ["lm_head"], "kv_cache_scheme": None,
        "global_compression_ratio": None})
    apply_quantization_config(plain, qcfg)
    report = CTExportReport(Path(out), config_groups=len(qcfg.config_groups), unfusable=unfusable_shards(slices))
    for name, (scale, zp, q, exact) in fits.items():
        mod = plain.get_submodule(name)
        st = slices[name]
        with torch.no_grad():
            mod.weight_scale.copy_(scale)
            mod.weight_zero_point.copy_(zp.to(mod.weight_zero_point.dtype))
            # the dense weight ON the fitted grid, so the compressor's own quantize() recovers exactly q
            w = scale.to(torch.float64).repeat_interleave(st.group_size, 1) * (
                q.double() - zp.double().repeat_interleave(st.group_size, 1))
            mod.weight.copy_(w.to(dtype))
        report.modules.append(ModuleReport(name, st.bits, float(exact.float().mean()), 0.0, 0.0, 0.0))
    compressor = ModelCompressor.from_pretrained_model(plain, quantization_format="pack-quantized")
    compressor.compress_model(plain)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        plain.save_pretrained(tmp)
        compressor.update_config(str(tmp))
        tokenizer.save_pretrained(tmp)
        _record(tmp, slices)
        report.weight_bytes = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))
    _measure(report, slices, out)
    return report


def _record(folder: Path, slices: dict[str, SliceTensor]) -> None:
    """What was exported, next to the model (config.json stays exactly as compressed-tensors writes it)."""
    info = {"bits": {n: st.bits for n, st in slices.items()}, "slicing": sorted({st.mode for st in slices.values()})}
    (Path(folder) / "matquant_export.json").write_text(json.dumps(info, indent=1) + "\n")


def _schemes_and_tensors(folder) -> tuple[dict, dict]:
    """({module: its config group's QuantizationScheme}, {tensor name: tensor}) of a pack-quantized folder."""
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors import safe_open

    cfg = json.loads((Path(folder) / "config.json").read_text())["quantization_config"]
    schemes = {}
    for g in cfg["config_groups"].values():
        for t in g["targets"]:
            schemes[t] = QuantizationScheme(targets=[t], weights=g["weights"])
    tensors = {}
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                tensors[k] = h.get_tensor(k)
    return schemes, tensors


def load_decompressed(folder, dtype: torch.dtype = torch.float32):
    """The exported folder as a dense transformers model, every module decompressed by compressed-tensors'
    PackedQuantizationCompressor with ITS OWN config group's scheme.

    Needed for bits maps (several config groups): transformers 5.24's `CompressedTensorsConfig(dequantize=True)`
    decompresses dense layers with one config group's scheme (`get_dense_scheme`), so a folder mixing e.g. 4- and
    2-bit groups fails to load there ("size of tensor a (3) must match ... b (4)"); a single-group folder loads fine
    through transformers directly."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from transformers import AutoConfig, AutoModelForCausalLM

    schemes, tensors = _schemes_and_tensors(folder)
    cfg = json.loads((Path(folder) / "config.json").read_text())
    cfg.pop("quantization_config")
    hf_cfg = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    sd = {k: v for k, v in tensors.items() if k.rsplit(".", 1)[-1] not in
          ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")}
    for name, scheme in schemes.items():
        parts = {k: tensors[f"{name}.{k}"] for k in ("weight_packed", "weight_scale", "weight_zero_point",
                                                       "weight_shape")}
        sd[f"{name}.weight"] = PackedQuantizationCompressor.decompress(parts, scheme)["weight"]
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if unexpected or [k for k in missing if not k.endswith("lm_head.weight")]:
        raise ExportError(f"{folder}: tensors do not match the model (missing {missing[:3]}, unexpected "
                          f"{unexpected[:3]})")
    model.tie_weights()
    return model.eval()


def _measure(report: CTExportReport, slices: dict[str, SliceTensor], out) -> None:
    """Weight error vs the slice, decompressing the written folder with compressed-tensors' own decompressor."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    schemes, tensors = _schemes_and_tensors(out)
    qbytes = qnum = 0
    for m in report.modules:
        qbytes += sum(tensors[f"{m.module}.{k}"].numel() * tensors[f"{m.module}.{k}"].element_size()
                      for k in ("weight_packed", "weight_scale", "weight_zero_point"))
        qnum += slices[m.module].reference.numel()
        sd = {k.rsplit(".", 1)[-1]: tensors[f"{m.module}.{k.rsplit('.', 1)[-1]}"]
              for k in ("x.weight_packed", "x.weight_scale", "x.weight_zero_point", "x.weight_shape")}
        w = PackedQuantizationCompressor.decompress(sd, schemes[m.module])["weight"].double()
        ref = slices[m.module].reference.double()
        err = w - ref
        m.rms_error = float(err.pow(2).mean().sqrt())
        m.max_error = float(err.abs().max())
        m.rel_rms_error = m.rms_error / max(float(ref.pow(2).mean().sqrt()), 1e-30)
    report.bits_per_weight = 8 * qbytes / max(qnum, 1)
