"""Perplexity ÷ fp32 of every slice with and without the clipping search (`clip`, quant/clip_search.py).

SmolLM2-135M (the embedded model), FFN scope, group 64, nested slicing, int8 master; each configuration is
METHOD-CLIP (e.g. rtn-minmax, rtn-mse, matgptq-weighted, gptq-mse, omniquant-mse, or fp32). One JSON row per
(configuration, bits) is appended to --out as it is measured (resumable: finished rows are skipped), with the
quantization time, the eval time and the machine load (os.getloadavg) next to the numbers.

    OMP_NUM_THREADS=1 PYTHONPATH=src python lab/benchmarks/clip_search_ppl.py \
        --out lab/results/clip_search.jsonl --configs fp32,rtn-minmax,rtn-mse,matgptq-minmax,matgptq-mse
    python lab/benchmarks/clip_search_ppl.py --out lab/results/clip_search.jsonl --table
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch


def load_rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in out.read_text().splitlines() if x.strip()] if out.exists() else []


def table(rows: list[dict], bits: list[int]) -> str:
    fp = {r["windows"]: r["ppl"] for r in rows if r["config"] == "fp32"}
    lines = ["| configuration | quantize s (load) | " + " | ".join(f"int{b}" for b in bits) + " |",
             "|---|---|" + "---|" * len(bits)]
    seen = []
    for r in rows:
        if r["config"] != "fp32" and r["config"] not in seen:
            seen.append(r["config"])
    for c in seen:
        rs = {r["bits"]: r for r in rows if r["config"] == c}
        any_r = next(iter(rs.values()))
        cells = []
        for b in bits:
            r = rs.get(b)
            cells.append("—" if r is None else f"{r['ppl']:.2f} ({r['ppl'] / fp[r['windows']]:.3f}×)")
        lines.append(f"| {c} | {any_r['quantize_seconds']:.0f} ({any_r['load_at_quantize']:.1f}) | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--configs", default="fp32,rtn-minmax,rtn-mse,matgptq-minmax,matgptq-mse,matgptq-weighted")
    ap.add_argument("--bits", default="8,6,4,3,2")
    ap.add_argument("--windows", type=int, default=6, help="eval windows of 2048 tokens of 'eval' (default 6)")
    ap.add_argument("--calib-windows", type=int, default=None, help="default: the method's (32 x 512; omniquant 8 x 256)")
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = ap.parse_args()
    out = Path(args.out)
    bits = [int(b) for b in args.bits.split(",")]
    if args.table:  # --out may name several files (comma-separated), e.g. runs made in parallel
        print(table([r for f in args.out.split(",") for r in load_rows(Path(f))], bits))
        return
    from matquant.algorithms import config_class, quantize_model
    from matquant.data import token_windows
    from matquant.eval.perplexity import perplexity
    from matquant.models import load_model
    from matquant.nn.bits import set_bits

    done = {(r["config"], r["bits"], r["windows"]) for r in load_rows(out)}
    out.parent.mkdir(parents=True, exist_ok=True)

    def write(row):
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")

    for config in args.configs.split(","):
        todo = [16] if config == "fp32" else [b for b in bits if (config, b, args.windows) not in done]
        if config == "fp32" and (config, 16, args.windows) in done or not todo:
            continue
        model, tok, _ = load_model("smollm2-135m")
        windows = token_windows(tok, "eval", 2048, args.windows)
        qsec, load_q = 0.0, os.getloadavg()[0]
        if config != "fp32":
            method, clip = config.split("-", 1)
            n, seqlen = config_class(method).calib_defaults
            calib = token_windows(tok, "calib", seqlen, args.calib_windows or n) \
                if method != "rtn" or clip == "weighted" else None
            t0 = time.time()
            quantize_model(model, method, master_bits=8, group_size=64, scope="ffn", slicing="nested",
                           calib=calib, progress=False, clip=clip)
            qsec = time.time() - t0
        for b in todo:
            if config != "fp32":
                set_bits(model, b)
            t0, load_e = time.time(), os.getloadavg()[0]
            r = perplexity(model, windows, progress=False)
            write({"config": config, "bits": b, "ppl": r.ppl, "windows": args.windows, "seqlen": 2048,
                   "scope": "ffn", "group_size": 64, "slicing": "nested", "master_bits": 8,
                   "quantize_seconds": round(qsec, 1), "load_at_quantize": round(load_q, 2),
                   "eval_seconds": round(time.time() - t0, 1), "load_at_eval": round(load_e, 2),
                   "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})


if __name__ == "__main__":
    main()
