"""Does llama.cpp's finer, quantized-parameter K-quant block help matquant's slices? (issue 27, part 3)

For each quantized module of a checkpoint (rows whose width divides 256) and each served width r, the calibration
output error of several ways to store the layer, relative to the output itself:

    E / ‖wX‖² = Σ_rows (w − ŵ) H (w − ŵ)ᵀ / Σ_rows w H wᵀ,     H = XᵀX of the layer's calibration inputs

  ours        the r-bit slice with its own per-group (α, z) as the checkpoint stores them (the reference
              `integrations/export_slices.py` gives every exporter)
  fit w       the K-quant block for the SAME codes fitted to the original weights w with imp = diag H
              (`quant/kquant.py`): what storing K-quant-form slice parameters at quantize time would give
  fit ŵ       the same fit to our slice values (uniform importance, and imp = diag H): what an exporter could do
              from the checkpoint alone (no w), keeping what GPTQ's error feedback built into ŵ
  nearest     the exporter's existing nearest encoder of that type (gguf_blocks.py; `export --k-quants`): codes
              re-chosen against block scales fitted to our slice values (Q2_K, Q3_K, Q8_0; none for Q4_K)
  llama.cpp   llama.cpp's own quantizer of w (free codes), through libggml's ggml_quantize_chunk, with the
              imatrix diag H / tokens (as llama-quantize --imatrix) and without; gguf-py has no K-quant quantizer

Widths and formats: int4 / Q4_K, int2 / Q2_K (affine, like ours), int3 / Q3_K and int8 / Q8_0 (symmetric: zero at
the code mid-point, so "same codes" loses our zero point). H comes from forward hooks on the FULL-PRECISION model
over the calibration windows the quantize run used (the embedded 'calib' text, disjoint from the evaluation text).

    matquant quantize --model qwen2.5-coder-0.5b --recipe quality \\
        --modules 'model\\.layers\\.(0|11|23)\\.mlp\\.down_proj' --calib-windows 8 --calib-seqlen 512 --out CK
    MATQUANT_LLAMA_CPP=.../llama.cpp/build/bin python lab/benchmarks/kquant_fit_probe.py CK \\
        --model qwen2.5-coder-0.5b --calib-windows 8 --calib-seqlen 512 --json OUT.json

libggml-base.so is looked for in $MATQUANT_LLAMA_CPP (or --libggml); without it the llama.cpp columns are skipped.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

PAIRS = "4:Q4_K,2:Q2_K,3:Q3_K,3:Q4_K,8:Q8_0"  # slice width : GGUF type (int3 codes 0..7 also fit Q4_K's 0..15)


def find_libggml(override: str | None) -> Path | None:
    if override:
        return Path(override)
    folder = os.environ.get("MATQUANT_LLAMA_CPP")
    if folder and (Path(folder) / "libggml-base.so").exists():
        return Path(folder) / "libggml-base.so"
    return None


class GgmlQuantizer:
    """llama.cpp's reference quantizers (ggml_quantize_chunk: the function llama-quantize calls per tensor)."""

    def __init__(self, path: Path):
        self.lib = ctypes.CDLL(str(path))
        f = self.lib.ggml_quantize_chunk
        f.restype = ctypes.c_size_t
        f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                      ctypes.c_void_p]

    def __call__(self, fmt: str, w: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        from matquant.quant.kquant import FORMATS

        qt = GGMLQuantizationType[fmt]
        f = FORMATS[fmt]
        w = np.ascontiguousarray(w, dtype=np.float32)
        rows, cols = w.shape
        out = np.zeros((rows, cols // f.block * f.block_bytes), np.uint8)
        im = None if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        n = self.lib.ggml_quantize_chunk(int(qt), w.ctypes.data, out.ctypes.data, 0, rows, cols,
                                         None if im is None else im.ctypes.data)
        if n != out.size:
            raise RuntimeError(f"ggml_quantize_chunk wrote {n} bytes, expected {out.size}")
        return dequantize(out, qt).reshape(rows, cols)


def current_nearest(fmt: str, sl) -> np.ndarray | None:
    """The slice through the exporter's existing nearest encoder of this type (integrations/gguf_blocks.py: codes
    re-chosen against the quantized block scales), dequantized by gguf-py; None where it has none."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    from matquant.integrations import gguf_blocks as gb

    v = sl.reference.numpy()
    if fmt == "Q2_K":
        a, b = (x.repeat_interleave(sl.group_size, dim=1).numpy() for x in (sl.a, sl.b))
        data = gb.encode_q2_k(v, a, b)
    elif fmt in ("Q3_K", "Q6_K", "Q8_0"):
        data = {"Q3_K": gb.encode_q3_k, "Q6_K": gb.encode_q6_k, "Q8_0": gb.encode_q8_0}[fmt](v)
    else:
        return None
    return dequantize(data, GGMLQuantizationType[fmt]).reshape(v.shape)


def hessians(model_spec: str, modules: list[str], windows: int, seqlen: int, threads: int):
    """{module: (w fp32 [out, in], H float64 [in, in], tokens)} from the full-precision model's calibration inputs."""
    from matquant.data import token_windows
    from matquant.models.loading import load_model

    torch.set_num_threads(threads)
    model, tok, _ = load_model(model_spec)
    ids = token_windows(tok, "calib", seqlen, windows)
    H = {n: torch.zeros(model.get_submodule(n).in_features, model.get_submodule(n).in_features, dtype=torch.float64)
         for n in modules}
    count = {n: 0 for n in modules}

    def hook(name):
        def f(_m, inp, _out):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
            H[name] += x.T @ x
            count[name] += x.shape[0]
        return f
    handles = [model.get_submodule(n).register_forward_hook(hook(n)) for n in modules]
    with torch.no_grad():
        for i in range(ids.shape[0]):
            model(ids[i:i + 1])
    for h in handles:
        h.remove()
    out = {n: (model.get_submodule(n).weight.detach().float().clone(), H[n], count[n]) for n in modules}
    del model
    return out


def rel_error(w: torch.Tensor, what: torch.Tensor, H: torch.Tensor) -> float:
    d = (w.double() - torch.as_tensor(what).double())
    ref = ((w.double() @ H) * w.double()).sum()
    return float(((d @ H) * d).sum() / ref)


def main(argv=None):
    from matquant.integrations.export_slices import CheckpointSource
    from matquant.quant.kquant import FORMATS, dequantize_kquant, fit_kquant

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--model", required=True, help="the model the checkpoint was quantized from (its fp weights)")
    p.add_argument("--pairs", default=PAIRS, help=f"WIDTH:TYPE pairs to compare (default {PAIRS})")
    p.add_argument("--h-cache", default=None, help="a .pt file: H and w read from it if it exists, else saved there")
    p.add_argument("--calib-windows", type=int, default=8)
    p.add_argument("--calib-seqlen", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--libggml", default=None, help="libggml-base.so (default: in $MATQUANT_LLAMA_CPP)")
    p.add_argument("--json", default=None, help="write the rows here")
    a = p.parse_args(argv)
    pairs = [(int(x.split(":")[0]), x.split(":")[1]) for x in a.pairs.split(",")]

    src = CheckpointSource(a.checkpoint, bits=8, need_tokenizer=False)
    if src.qconfig.rotation:
        raise SystemExit("this probe compares in the original basis: use a checkpoint without rotation")
    pbits = {"float16": 16, "bfloat16": 16, "float32": 32}[src.qconfig.param_dtype]
    names = [n for n in src.slice_names if src.layout(n).shape[1] % 256 == 0]
    skipped = [n for n in src.slice_names if n not in names]
    src.close()
    if not names:
        raise SystemExit("no quantized module has rows that divide 256")
    t0 = time.time()
    if a.h_cache and Path(a.h_cache).exists():
        data = torch.load(a.h_cache)
    else:
        data = hessians(a.model, names, a.calib_windows, a.calib_seqlen, a.threads)
        if a.h_cache:
            torch.save(data, a.h_cache)
    print(f"H of {len(names)} modules in {time.time() - t0:.0f}s; skipped (width not /256): {len(skipped)}")
    lib = find_libggml(a.libggml)
    quantizer = GgmlQuantizer(lib) if lib else None
    if quantizer is None:
        print("llama.cpp columns skipped: no libggml-base.so (set MATQUANT_LLAMA_CPP or --libggml)")

    rows = []
    for r, fmt_name in pairs:
        fmt = FORMATS[fmt_name]
        src = CheckpointSource(a.checkpoint, bits=r, need_tokenizer=False)
        for name in names:
            w, H, ntok = data[name]
            sl = src.slice(name)
            imp = torch.diagonal(H).numpy()
            ours_bits = r + 2 * pbits / sl.group_size  # one scale and one zero per group (this slice's own pair)
            res = {"module": name, "bits": r, "format": fmt.name, "group_size": sl.group_size,
                   "ours_bpw": ours_bits, "k_bpw": fmt.bits_per_weight}
            res["ours"] = rel_error(w, sl.reference, H)
            codes = sl.codes.numpy()
            t = time.time()
            res["fit_w"] = rel_error(w, dequantize_kquant(fit_kquant(fmt.name, codes, w.numpy(), imp)), H)
            res["fit_w_s"] = time.time() - t
            res["fit_what"] = rel_error(w, dequantize_kquant(fit_kquant(fmt.name, codes, sl.reference.numpy())), H)
            res["fit_what_imp"] = rel_error(w, dequantize_kquant(fit_kquant(fmt.name, codes, sl.reference.numpy(),
                                                                            imp)), H)
            nearest = current_nearest(fmt.name, sl)
            if nearest is not None:
                res["export_nearest"] = rel_error(w, nearest, H)
            if quantizer is not None:
                res["llama_imatrix"] = rel_error(w, quantizer(fmt.name, w.numpy(), imp / ntok), H)
                res["llama_plain"] = rel_error(w, quantizer(fmt.name, w.numpy(), None), H)
            rows.append(res)
            print(json.dumps(res), flush=True)
        src.close()

    def f(x):
        return "—" if x is None else f"{x:.5f}"
    print("\n| module | width | ours (bpw) | ours E | K fmt (bpw) | fit w, same codes | fit ŵ, same codes "
          "| fit ŵ, imp | nearest (export) | llama.cpp + imatrix | llama.cpp plain |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for x in rows:
        mod = x["module"].replace("model.layers.", "L").replace(".mlp.down_proj", " down")
        print(f"| {mod} | int{x['bits']} | {x['ours_bpw']:.3g} | {f(x['ours'])} | {x['format']} ({x['k_bpw']:.4g}) "
              f"| {f(x['fit_w'])} | {f(x['fit_what'])} | {f(x['fit_what_imp'])} | {f(x.get('export_nearest'))} "
              f"| {f(x.get('llama_imatrix'))} "
              f"| {f(x.get('llama_plain'))} |")
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
