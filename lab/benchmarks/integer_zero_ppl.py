"""Integer vs free zero points from ONE quantization run: the same codes, read with free (fractional) zero points and
with the integer-zero pairs (quant/integer_zero.py), as two checkpoints that `matquant eval` scores side by side.

    python lab/benchmarks/integer_zero_ppl.py [--recipe quality] [--method M] [--scope ffn] [--threads 2] [--work DIR]
    matquant eval WORK/integer-zero/<tag>/free ; matquant eval WORK/integer-zero/<tag>/integer

The run quantizes with zero_points='free' and, inside the block-wise pass, also fits the integer-zero pairs of every
layer from the same (W, H, codes) (`slice_params.integer_zero_pairs`); the second checkpoint is the first with those
pairs swapped in (codes identical by construction). Per layer it records the slices' calibration output error
tr((W − Ŵ)H(W − Ŵ)ᵀ) with the free pair, the free pair's zero rounded to the grid, and the integer-zero fit
(WORK/integer-zero/<tag>/layers.jsonl). Only for gptq/matgptq (the methods whose pass passes H to with_slice_params).

    python lab/benchmarks/integer_zero_ppl.py --from CKPT [--tag T]

instead converts an existing free-zero-point checkpoint of the embedded SmolLM2 (e.g. one `--recipe quality` made
before integer zero points existed): one block-wise Hessian pass over the method's calibration windows (the
checkpoint's earlier layers in place as their dequantized masters, as MatGPTQ's own pass sees them; slice_params.py
`fit_slice_params` does the same for RTN), each layer's integer-zero pairs fitted from its (W, H) and stored codes.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _paths  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default="quality")
    p.add_argument("--method", default=None)
    p.add_argument("--scope", default="ffn")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default=None)
    p.add_argument("--work", default=None)
    p.add_argument("--calib-windows", type=int, default=None,
                   help="with --from: calibration windows of the Hessian pass (default: the method's)")
    p.add_argument("--from", dest="source", default=None, metavar="CKPT",
                   help="convert this free-zero-point checkpoint instead of quantizing")
    args = p.parse_args(argv)

    import matquant
    import importlib

    gptq_mod = importlib.import_module("matquant.algorithms.gptq")  # (the package re-exports functions of these names)
    matgptq_mod = importlib.import_module("matquant.algorithms.matgptq")
    from matquant.algorithms import slice_params as sp
    from matquant.quant.integer_zero import snap_to_grid
    from matquant.quant.minmax import QuantizedWeight, dequantize

    tag = args.tag or f"{args.method or args.recipe}-{args.scope}"
    out = _paths.work_path("integer-zero", tag, work=args.work)
    out.mkdir(parents=True, exist_ok=True)
    stash, rows, current = {}, [], [None]
    (out / "layers.jsonl").unlink(missing_ok=True)

    def err(W, H, qw, r, slicing):  # (float32: a diagnostic, summed over the layer)
        E = (W.float() - dequantize(qw, r, slicing))
        return float(((E @ H.float()) * E).sum(1).double().sum())

    def wrap_slice_params(orig):
        def fn(qw, W, H, slice_params, slicing, symmetric, param_dtype):
            res = orig(qw, W, H, slice_params, slicing, symmetric, param_dtype, zero_points="free")
            own = {r: (s.clone(), z.clone()) for r, (s, z) in (res.slice_params or {}).items()}
            ints = sp.integer_zero_pairs(QuantizedWeight(res.codes, res.scales.clone(), res.zeros.clone(), res.bits,
                                                         res.group_size, own or None), W, H, slicing, param_dtype)
            name = current[0]
            stash[f"{name}.scales"], stash[f"{name}.zeros"] = ints.scales.contiguous(), ints.zeros.contiguous()
            for r, (s, z) in (ints.slice_params or {}).items():
                stash[f"{name}.scales_int{r}"], stash[f"{name}.zeros_int{r}"] = s.contiguous(), z.contiguous()
            row = {"layer": name}
            for r in (res.bits, 4):
                fs, fz = (res.slice_params or {}).get(r, (res.scales, res.zeros))
                rs, rz = (ints.slice_params or {}).get(r, (ints.scales, ints.zeros))
                free = QuantizedWeight(res.codes, fs, fz, res.bits, res.group_size)
                rounded = QuantizedWeight(res.codes, fs, snap_to_grid(fz, res.bits, r, slicing).to(fz.dtype),
                                          res.bits, res.group_size)
                fit = QuantizedWeight(res.codes, rs, rz, res.bits, res.group_size)
                row[f"int{r}"] = {k: err(W, H, q, r, slicing) for k, q in
                                  (("free", free), ("rounded", rounded), ("integer", fit))}
            rows.append(row)
            with open(out / "layers.jsonl", "a") as f:  # as it goes: a long run's rows can be read early
                f.write(json.dumps(row) + "\n")
            return res
        return fn

    def wrap_pass(orig):
        def fn(model, targets, calib, f, **kw):
            def named(name, W, H):
                current[0] = name
                return f(name, W, H)
            return orig(model, targets, calib, named, **kw)
        return fn

    free_dir, int_dir = out / "free", out / "integer"
    if args.source:
        _convert(args, free_dir, wrap_slice_params, current)
    else:
        for mod in (gptq_mod, matgptq_mod):
            mod.with_slice_params = wrap_slice_params(mod.with_slice_params)
            mod.hessian_pass = wrap_pass(mod.hessian_pass)
        opts = {"scope": args.scope, "zero_points": "free"}
        matquant.quantize("smollm2-135m", out=free_dir, overwrite=True, recipe=None if args.method else args.recipe,
                          method=args.method, threads=args.threads, **opts)
    if int_dir.exists():
        shutil.rmtree(int_dir)
    shutil.copytree(free_dir, int_dir)
    (f,) = int_dir.glob("model*.safetensors")
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as h:
        meta = h.metadata()
    t = load_file(f)
    missing = [k for k in stash if k not in t]
    if missing:
        raise SystemExit(f"integer pairs without a checkpoint tensor: {missing[:3]}")
    t.update({k: v.to(t[k].dtype) for k, v in stash.items()})
    save_file(t, f, metadata=meta)
    cfg = json.loads((int_dir / "config.json").read_text())
    cfg["quantization_config"]["method_args"].pop("zero_points", None)
    (int_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for r in (8, 4):
        s = {v: sum(x[f"int{r}"][v] for x in rows) for v in ("free", "rounded", "integer")}
        print(f"int{r}: output error summed over {len(rows)} layers: free {s['free']:.4g}, zero rounded "
              f"{s['rounded']:.4g} ({s['rounded'] / s['free']:.3f}x), integer fit {s['integer']:.4g} "
              f"({s['integer'] / s['free']:.3f}x)")
    print(f"wrote {free_dir} and {int_dir}")
    return 0


def _convert(args, free_dir: Path, wrap_slice_params, current) -> None:
    """free_dir = a copy of args.source; the wrapped with_slice_params stashes each layer's integer pairs."""
    from matquant.algorithms import Calibration
    from matquant.algorithms.hessian_pass import hessian_pass
    from matquant.algorithms.pipeline import set_threads
    from matquant.algorithms.recipes import resolve_config
    from matquant.format.checkpoint import read_quant_config
    from matquant.models.loading import load_model
    from matquant.quant.minmax import QuantizedWeight

    set_threads(args.threads)
    if free_dir.exists():
        shutil.rmtree(free_dir)
    shutil.copytree(args.source, free_dir)
    _, qcfg = read_quant_config(free_dir)
    config = resolve_config(qcfg.method, **qcfg.method_args)
    model, tok = load_model("smollm2-135m")[:2]
    calib = Calibration(windows=args.calib_windows).resolved(config).token_windows(tok, config)
    (f,) = free_dir.glob("model*.safetensors")
    t = load_file(f)
    own_bits = qcfg.slice_params or []
    fit = wrap_slice_params(lambda qw, *a, **k: qw)  # the checkpoint's pairs as they are, + the integer ones

    def layer(name, W, H):
        current[0] = name
        qw = QuantizedWeight(t[f"{name}.qweight"], t[f"{name}.scales"], t[f"{name}.zeros"], qcfg.master_bits,
                             qcfg.group_size, {r: (t[f"{name}.scales_int{r}"], t[f"{name}.zeros_int{r}"])
                                               for r in own_bits} or None)
        return fit(qw, W, H, "own" if own_bits else "shared", qcfg.slicing, qcfg.symmetric,
                   getattr(torch, qcfg.param_dtype))

    hessian_pass(model, qcfg.modules, calib, layer, desc="integer zero points")


if __name__ == "__main__":
    raise SystemExit(main())
