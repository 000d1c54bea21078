"""Perplexity of every slice for RTN / GPTQ / MatGPTQ on the embedded SmolLM2-135M (docs/results.md, 'GPTQ').

Each configuration quantizes a fresh copy of the fp32 model and evaluates the requested (bits, slicing) grid on a
fixed evaluation set. Results are appended to a JSON file after every configuration (re-running skips the ones
already there; quantized models are saved next to the JSON file and reloaded), so a long run can be split into
several shorter ones, e.g. under `timeout 900`.

    OMP_NUM_THREADS=1 PYTHONPATH=src python lab/benchmarks/gptq_ppl.py --out bench-gptq/ffn.json --scope ffn \\
        --configs fp32,rtn8,gptq8,gptq6,gptq4,gptq3,gptq2,matgptq-w-paper,matgptq-w-nested
Configurations:
    fp32                        the reference (dequantized GGUF, fp32)
    rtn8 / gptq8                one int8 model, sliced to every bit-width in both modes
    gptqB                       dedicated GPTQ at B bits (evaluated at B only)
    matgptq-<fb>-<mode>[-<v>]   MatGPTQ built for slicing <mode> with error feedback <fb> (w=weighted, m=mean,
                                x=master); variants: s = group-param search, r4 = R=(8,4,3,2) λ=(.1,.1,.5,1),
                                l16 = λ=(16,4,1); generic: R8432 = R=(8,4,3,2), L16_4_2_1 = λ=(16,4,2,1), P4 / Pfp = propagate
"""
from __future__ import annotations

import argparse
import copy
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from matquant.algorithms import quantize_model  # noqa: E402
from matquant.data import token_windows  # noqa: E402
from matquant.eval.perplexity import perplexity  # noqa: E402
from matquant.format.atomic import atomic_write_json  # noqa: E402
from matquant.format.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from matquant.models import load_model  # noqa: E402
from matquant.nn.bits import set_bits  # noqa: E402

FB = {"w": "weighted", "m": "mean", "x": "master"}


def plan(name: str, bits: list[int], modes: list[str]):
    """(method, quantize kwargs, [(bits, mode)] to evaluate)."""
    if name == "fp32":
        return None, {}, [(32, "-")]
    if name in ("rtn8", "gptq8"):
        return name[:-1], {"master_bits": 8}, [(b, m) if b < 8 else (8, "any") for b in bits
                                              for m in (modes if b < 8 else modes[:1])]
    if name.startswith("gptq"):
        b = int(name[4:])
        return "gptq", {"master_bits": b}, [(b, "any")]
    if name.startswith("matgptq-"):
        parts = name.split("-")
        fb, mode, variants = FB[parts[1]], parts[2], parts[3:]
        kw = {"master_bits": 8, "slicing": mode, "error_feedback": fb, "bits_list": [8, 4, 2],
              "lambdas": [0.1, 0.1, 1.0]}  # the QAT λ (names without R/L variants keep R = 8,4,2)
        if "s" in variants:
            kw["group_params"] = "search"
        if "l16" in variants:
            kw["lambdas"] = [16.0, 4.0, 1.0]
        if "r4" in variants:
            kw["bits_list"], kw["lambdas"] = [8, 4, 3, 2], [0.1, 0.1, 0.5, 1.0]
        for v in variants:  # generic: R8432 = bits list 8,4,3,2; L16_4_2_1 = lambdas 16,4,2,1
            if v.startswith("R") and v[1:].isdigit():
                kw["bits_list"] = [int(c) for c in v[1:]]
            elif v.startswith("L"):
                kw["lambdas"] = [float(x) for x in v[1:].split("_")]
            elif v.startswith("P"):  # P4 / Pfp: propagate the int4 slice / the fp weights
                kw["propagate"] = v[1:]
        return "matgptq", kw, [(b, mode if b < 8 else "any") for b in bits]
    raise ValueError(f"unknown configuration {name}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", required=True)
    ap.add_argument("--scope", default="ffn")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--bits", default="8,6,4,3,2")
    ap.add_argument("--modes", default="paper,nested")
    ap.add_argument("--calib-windows", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--eval-seqlen", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    bits = [int(x) for x in a.bits.split(",")]
    modes = a.modes.split(",")
    out = Path(a.out)
    res = json.loads(out.read_text()) if out.exists() else {"rows": [], "meta": {}}
    done = {(r["config"], r["bits"], r["slicing"]) for r in res["rows"]}
    ckroot = out.parent / (out.stem + "-ckpt")
    base, tok, src = load_model("smollm2-135m")
    ev = token_windows(tok, "eval", a.eval_seqlen, a.eval_windows)
    calib = token_windows(tok, "calib", a.calib_seqlen, a.calib_windows)
    res["meta"] = {"model": src.describe(), "scope": a.scope, "group_size": a.group_size,
                   "calib": f"{a.calib_windows}x{a.calib_seqlen} 'calib'", "eval": f"{ev.shape[0]}x{ev.shape[1]} 'eval'",
                   "threads": a.threads, "torch": torch.__version__}
    for name in a.configs.split(","):
        if name in done:
            print(f"skip {name} (done)", flush=True)
            continue
        method, kw, grid = plan(name, bits, modes)
        grid = [(b, m) for b, m in grid if (name, b, m) not in done]
        if not grid:
            print(f"skip {name} (done)", flush=True)
            continue
        t0 = time.time()
        ck = ckroot / name
        qs = next((r["quant_seconds"] for r in res["rows"] if r["config"] == name), 0.0)
        qcpu = next((r.get("quant_cpu_seconds", 0.0) for r in res["rows"] if r["config"] == name), 0.0)
        c0 = time.process_time()
        if method is None:
            model = base
        elif (ck / "config.json").exists():  # resumed: the quantized model was saved by an earlier run
            model, _, _ = load_checkpoint(ck)
        else:
            model = copy.deepcopy(base)
            qcfg = quantize_model(model, method, group_size=a.group_size, scope=a.scope, progress=False,
                                  calib=calib if method != "rtn" else None, **kw)
            qs, qcpu = time.time() - t0, time.process_time() - c0
            save_checkpoint(model, None, ck, qcfg, overwrite=True)
            print(f"{name}: quantized in {qs:.0f}s wall, {qcpu:.0f}s CPU", flush=True)
        for b, mode in grid:
            if method is not None:
                set_bits(model, b, None if mode == "any" else mode)
            r = perplexity(model, ev, progress=False)
            row = {"config": name, "method": method or "fp32", "bits": b, "slicing": mode, "ppl": r.ppl,
                   "quant_seconds": round(qs, 1), "quant_cpu_seconds": round(qcpu, 1),
                   "calib": res["meta"]["calib"], "eval": res["meta"]["eval"], **{k: v for k, v in kw.items() if k != "master_bits"}}
            res["rows"].append(row)
            print(json.dumps(row), flush=True)
            res["peak_rss_gib"] = max(res.get("peak_rss_gib", 0),
                                      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
            atomic_write_json(out, res)
        print(f"{name}: {time.time() - t0:.0f}s", flush=True)
        del model


if __name__ == "__main__":
    main()
