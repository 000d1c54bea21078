"""Rotations end to end (issue 14): perplexity / fp32 of every slice for method × --rotate, real model.

For each (method, rotation): `quantize_model(load_model(model), method, rotate=rotation)` with the method's
defaults (the CLI's calibration windows from the embedded 'calib' text, FFN scope, group 64, nested slicing,
int8 master), then the perplexity of each slice on the held-out 'eval' text (6 × 2048 windows) of the in-memory
model (the reference torch backend; the online transform runs in every forward). One JSON row per
(method, rotation, bits) is appended to --out as it goes; rerunning skips rows already there.

    OMP_NUM_THREADS=1 PYTHONPATH=src python lab/benchmarks/rotation_table.py \
        --out lab/results/rotation_table.jsonl --methods matgptq --rotations input,block --bits 4,3,2
    python lab/benchmarks/rotation_table.py --out lab/results/rotation_table.jsonl --table
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def append(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def table(rows: list[dict], bits=(8, 6, 4, 3, 2)) -> str:
    fp = next((r["ppl"] for r in rows if r["method"] == "fp32"), None)
    if fp is None:
        return "(no fp32 row yet)"
    cells: dict = {}
    for r in rows:
        if r["method"] != "fp32":
            cells[(r["method"], r["rotation"], r["bits"])] = r["ppl"] / fp
    keys = sorted({(m, rot) for m, rot, _ in cells}, key=lambda k: (k[0], ("none", "input", "block").index(k[1])))
    out = [f"fp32 perplexity {fp:.3f}", "", "| method | rotate | " + " | ".join(f"int{b}" for b in bits) + " |",
           "|---|---|" + "---|" * len(bits)]
    for m, rot in keys:
        vals = [cells.get((m, rot, b)) for b in bits]
        out.append(f"| {m} | {rot} | " + " | ".join("—" if v is None else (f"{v:.3f}×" if v < 10 else f"{v:.1f}×")
                                                     for v in vals) + " |")
    return "\n".join(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--methods", default="rtn,matgptq")
    ap.add_argument("--rotations", default="none,input,block")
    ap.add_argument("--bits", default="8,6,4,3,2")
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--no-fp32", action="store_true", help="skip the fp32 row (another run of the same --model has it)")
    ap.add_argument("--table", action="store_true", help="print the markdown table of --out (comma-separated files) "
                                                         "and exit")
    args = ap.parse_args()
    if args.table:
        print(table([r for f in args.out.split(",") for r in rows_of(Path(f))]))
        return
    out = Path(args.out)
    from matquant.algorithms import config_class, quantize_model
    from matquant.data import token_windows
    from matquant.eval.perplexity import perplexity
    from matquant.models.loading import load_model
    from matquant.nn.bits import set_bits

    bits = [int(b) for b in args.bits.split(",")]
    env = {"threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()}
    done = {(r["method"], r.get("rotation"), r["bits"]) for r in rows_of(out)}
    model, tok, _ = load_model(args.model)
    windows = token_windows(tok, "eval", args.seqlen, args.windows)
    if ("fp32", None, 32) not in done and not args.no_fp32:
        with torch.no_grad():
            t0 = time.time()
            r = perplexity(model, windows, progress=False)
        append(out, {"method": "fp32", "rotation": None, "bits": 32, "ppl": r.ppl, "eval_s": round(time.time() - t0, 1),
                     "windows": args.windows, "seqlen": args.seqlen, **env})
    for method in args.methods.split(","):
        for rot in args.rotations.split(","):
            todo = [b for b in bits if (method, rot, b) not in done]
            if not todo:
                continue
            model, tok, _ = load_model(args.model)
            calib = None
            if config_class(method).data_driven:
                n, seqlen = config_class(method).calib_defaults
                calib = token_windows(tok, "calib", seqlen, n)
            t0 = time.time()
            qcfg = quantize_model(model, method, calib=calib, progress=False, rotate=rot)
            quant_s = time.time() - t0
            for b in todo:
                set_bits(model, b)
                t1 = time.time()
                with torch.no_grad():
                    r = perplexity(model, windows, progress=False)
                append(out, {"method": method, "rotation": rot, "bits": b, "ppl": r.ppl, "scope": qcfg.scope,
                             "group_size": qcfg.group_size, "slicing": qcfg.slicing, "master_bits": qcfg.master_bits,
                             "rotation_spec": qcfg.rotation, "quant_s": round(quant_s, 1),
                             "eval_s": round(time.time() - t1, 1), "windows": args.windows, "seqlen": args.seqlen,
                             "load": open("/proc/loadavg").read().split()[0], **env})


if __name__ == "__main__":
    main()
