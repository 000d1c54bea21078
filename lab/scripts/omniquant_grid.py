"""OmniQuant(+MatQuant) on SmolLM2-135M, FFN-only, g64: train one configuration, then perplexity per sliced precision.

    PYTHONPATH=src python lab/scripts/omniquant_grid.py --run matquant_842 --slicing nested   # one run -> WORK/omni/*.json
    PYTHONPATH=src python lab/scripts/omniquant_grid.py --run rtn --slicing paper             # RTN sliced from int8
    PYTHONPATH=src python lab/scripts/omniquant_grid.py --run fp                              # fp32 reference
    PYTHONPATH=src python lab/scripts/omniquant_grid.py --table                               # markdown from the JSONs

Each run records its training wall time and the process's peak RSS. Evaluation: the first `--eval-windows`
(default 8) windows × 2048 tokens of the embedded 'eval' text; calibration: 'calib' text (disjoint).
WORK is the work folder (--work, else $MATQUANT_WORK, else ./matquant-work; lab/benchmarks/_paths.py).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _paths import add_work_option, work_path  # noqa: E402

RUNS = {  # name: (method, master bits, omniquant args, bits to evaluate)
    "fp": ("fp", 8, {}, []),
    "rtn": ("rtn", 8, {}, [8, 6, 4, 3, 2]),
    "matquant_842": ("omniquant", 8, {"bits_list": [8, 4, 2]}, [8, 6, 4, 3, 2]),
    "matquant_8432": ("omniquant", 8, {"bits_list": [8, 4, 3, 2]}, [8, 6, 4, 3, 2]),
    "matquant_842_l111": ("omniquant", 8, {"bits_list": [8, 4, 2], "lambdas": [1.0, 1.0, 1.0]}, [8, 6, 4, 3, 2]),
    "matquant_842_bal": ("omniquant", 8, {"bits_list": [8, 4, 2], "loss_balance": "initial"}, [8, 6, 4, 3, 2]),
    "matquant_842_bal_l111": ("omniquant", 8, {"bits_list": [8, 4, 2], "lambdas": [1.0, 1.0, 1.0],
                                               "loss_balance": "initial"}, [8, 6, 4, 3, 2]),
    "matquant_842_bal_l001": ("omniquant", 8, {"bits_list": [8, 4, 2], "lambdas": [0.01, 0.01, 1.0],
                                               "loss_balance": "initial"}, [8, 6, 4, 3, 2]),
    "matquant_842_bal_l0001": ("omniquant", 8, {"bits_list": [8, 4, 2], "lambdas": [0.001, 0.001, 1.0],
                                                "loss_balance": "initial"}, [8, 6, 4, 3, 2]),
    "codistill_842_8to2_bal_l001": ("omniquant", 8, {"distill": "[8,4,2,8->2]", "lambdas": [0.01, 0.01, 1.0],
                                                     "loss_balance": "initial"}, [8, 6, 4, 3, 2]),
    "codistill_842_8to2": ("omniquant", 8, {"distill": "[8,4,2,8->2]"}, [8, 6, 4, 3, 2]),
    "codistill_84_8to2": ("omniquant", 8, {"distill": "[8,4,8->2]"}, [8, 6, 4, 3, 2]),
    "sp_int2": ("omniquant", 8, {"bits_list": [2]}, [8, 6, 4, 3, 2]),
    "dedicated_int8": ("omniquant", 8, {"bits_list": [8]}, [8]),
    "dedicated_int6": ("omniquant", 6, {"bits_list": [6]}, [6]),
    "dedicated_int4": ("omniquant", 4, {"bits_list": [4]}, [4]),
    "dedicated_int3": ("omniquant", 3, {"bits_list": [3]}, [3]),
    "dedicated_int2": ("omniquant", 2, {"bits_list": [2]}, [2]),
}


def run_one(a) -> dict:
    from matquant.algorithms import quantize_model
    from matquant.data import token_windows
    from matquant.eval.grid import ppl_grid
    from matquant.eval.perplexity import perplexity
    from matquant.models import load_model

    torch.set_num_threads(a.threads)
    method, master, kw, bits = RUNS[a.run]
    if a.bits:
        bits = [b for b in bits if b in a.bits]
    # the dequantized GGUF, cached once as an fp32 HF folder (identical weights; skips the slow GGUF conversion)
    cache = Path(a.out).parent / "fp_model"
    model, tok, _ = load_model(str(cache) if (cache / "config.json").exists() else "smollm2-135m")
    ev = token_windows(tok, "eval", 2048, a.eval_windows)
    rec = {"run": a.run, "tag": a.tag, "slicing": a.slicing, "threads": a.threads, "eval_windows": a.eval_windows,
           "eval_seqlen": 2048}
    if method == "fp":
        t0 = time.time()
        rec["rows"] = [{"bits": "fp32", "slicing": "-", "ppl": perplexity(model, ev, progress=False).ppl}]
        rec["eval_s"] = time.time() - t0
        return rec
    calib = token_windows(tok, "calib", a.calib_seqlen, a.calib_windows) if method == "omniquant" else None
    args = dict(kw)
    if method == "omniquant":
        args.update(epochs=a.epochs, lr=a.lr, lr_lwc=a.lr_lwc, let=a.let, block_inputs=a.block_inputs,
                    work_dir=str(Path(a.out) / "work" / f"{a.run}_{a.slicing}{a.tag}"))
        rec.update(calib_windows=a.calib_windows, calib_seqlen=a.calib_seqlen, epochs=a.epochs, lr=a.lr, lr_lwc=a.lr_lwc, let=a.let,
                   block_inputs=a.block_inputs, method_args=kw)
    t0 = time.time()
    rec["group_size"] = a.group_size
    quantize_model(model, method, master_bits=master, group_size=a.group_size, scope="ffn", slicing=a.slicing,
                   calib=calib, progress=not a.quiet, **args)
    rec["train_s"] = round(time.time() - t0, 1)
    rec["peak_rss_gib_after_train"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    t0 = time.time()
    rec["rows"] = ppl_grid(model, ev, bits, modes=(a.slicing,), progress=False)
    rec["eval_s"] = round(time.time() - t0, 1)
    return rec


def table(out: Path) -> str:
    recs = []
    for p in sorted(out.glob("*.json")):
        r = json.loads(p.read_text())
        r.setdefault("tag", p.stem[len(f"{r['run']}_{r.get('slicing', '')}"):] if r["run"] != "fp" else "")
        recs.append(r)
    fp = next((r["rows"][0]["ppl"] for r in recs if r["run"] == "fp"), None)
    lines = ["| run | train slicing | int8 | int6 | int4 | int3 | int2 | train s | peak RSS GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        if r["run"] == "fp":
            continue
        by = {row["bits"]: row["ppl"] for row in r["rows"]}
        cells = []
        for b in (8, 6, 4, 3, 2):
            cells.append("—" if b not in by else f"{by[b]:.2f} ({by[b] / fp:.2f}×)" if fp else f"{by[b]:.2f}")
        lines.append(f"| {r['run']}{r.get('tag', '')} | {r['slicing']} | " + " | ".join(cells) +
                     f" | {r.get('train_s', 0):.0f} | {r.get('peak_rss_gib_after_train', float('nan')):.2f} |")
    head = f"fp32 reference perplexity: {fp:.3f}\n\n" if fp else ""
    return head + "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", choices=sorted(RUNS))
    p.add_argument("--slicing", default="nested", choices=("paper", "nested", "extra"))
    p.add_argument("--table", action="store_true")
    p.add_argument("--out", default=None, help="result folder (default: WORK/omni)")
    add_work_option(p, "the default --out")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--eval-windows", type=int, default=8)
    p.add_argument("--calib-windows", type=int, default=8)
    p.add_argument("--calib-seqlen", type=int, default=256)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lr-lwc", type=float, default=2e-1)
    p.add_argument("--group-size", type=int, default=64, help="(use --tag to keep runs apart, e.g. _g192)")
    p.add_argument("--let", action="store_true")
    p.add_argument("--block-inputs", default="quant", choices=("quant", "fp"))
    p.add_argument("--tag", default="", help="suffix for the result file name")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--bits", type=lambda v: [int(x) for x in v.split(",")], default=None,
                   help="evaluate only these of the run's precisions (e.g. 4,3,2)")
    a = p.parse_args()
    a.out = a.out or str(work_path("omni", work=a.work))
    out = Path(a.out)
    if a.table:
        print(table(out))
        return
    from matquant.format.atomic import atomic_write_json

    rec = run_one(a)
    name = f"{a.run}_{a.slicing}{a.tag}" if a.run != "fp" else "fp"
    atomic_write_json(out / f"{name}.json", rec)
    print(json.dumps(rec, indent=1))


if __name__ == "__main__":
    main()
