"""CPU speed of one MatQuantLinear call: reference torch path vs the fast CPU path, uncached and cached.

    PYTHONPATH=src python lab/benchmarks/bench_cpu_linear.py [--threads 1] [--out lab/results/cpu_linear.json]

Rows (per layer shape [out × in], batch, bits, slicing mode), milliseconds per call (median):
  dense       fp32 F.linear with a ready weight: the floor, and what every *cached* path costs
  ref         torch_ref.dequantize_slice + F.linear (the torch backend's first call after set_bits)
  cpu         kernels.cpu.linear from the uint8 master codes, no cache
  cpu-cached  kernels.cpu.linear with a per-precision WeightCache (steady state)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from matquant.format.atomic import atomic_write_json
from matquant.kernels import cpu, torch_ref
from matquant.quant.minmax import quantize_minmax

SHAPES = [(1536, 576), (576, 1536), (4096, 4096)]  # [out, in]: SmolLM2 gate/up, SmolLM2 down, 4096²


def timeit(fn, budget_s: float = 0.6, min_reps: int = 5, max_reps: int = 200) -> float:
    """Median milliseconds of *this thread's CPU time* per call (time.thread_time). With one intra-op thread the
    work runs on the calling thread, so this excludes time the OS gave to other processes on a shared machine
    (wall-clock medians were unusable under a load average of ~10 on 2 cores)."""
    fn()  # warm-up
    times = []
    t_end = time.thread_time() + budget_s
    while len(times) < min_reps or (time.thread_time() < t_end and len(times) < max_reps):
        t0 = time.thread_time()
        fn()
        times.append(time.thread_time() - t0)
    return statistics.median(times) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4, 3, 2])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--out", default=None, help="optional JSON file for the raw numbers")
    ap.add_argument("--from-json", default=None, help="only print the summary table of a saved run")
    args = ap.parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        print(json.dumps(saved["meta"]))
        print(summary_table(saved["rows"]))
        return
    if args.threads != 1:
        raise SystemExit("--threads must be 1: the timer measures the calling thread's CPU time")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    done = set()
    if args.out and os.path.exists(args.out):  # resume: rows already measured by an interrupted run are kept
        with open(args.out) as f:
            rows = json.load(f)["rows"]
        done = {(r["shape"], r["batch"], r["bits"], r["mode"]) for r in rows}
        print(f"resuming: {len(rows)} rows already in {args.out}")
    meta = dict(date=datetime.date.today().isoformat(), threads=args.threads, torch=torch.__version__,
                timer="thread CPU time, median", load_average=list(os.getloadavg()),
                cpu=platform.processor() or platform.machine(), group_size=args.group_size)
    for out_f, in_f in SHAPES:
        qw = quantize_minmax(torch.randn(out_f, in_f) * 0.02, 8, args.group_size)
        for m in args.batches:
            x = torch.randn(m, in_f)
            w_dense = torch.randn(out_f, in_f)
            dense = timeit(lambda: F.linear(x, w_dense))
            for bits in args.bits:
                for mode in ("paper", "nested"):
                    if (f"{out_f}x{in_f}", m, bits, mode) in done:
                        continue
                    cache = cpu.WeightCache(1)
                    r = dict(shape=f"{out_f}x{in_f}", batch=m, bits=bits, mode=mode, dense=dense)
                    r["ref"] = timeit(lambda: F.linear(x, torch_ref.dequantize_slice(
                        qw.codes, qw.scales, qw.zeros, 8, bits, mode, x.dtype)))
                    r["cpu"] = timeit(lambda: cpu.linear(x, qw.codes, qw.scales, qw.zeros, 8, bits, mode))
                    r["cpu-cached"] = timeit(lambda: cpu.linear(x, qw.codes, qw.scales, qw.zeros, 8, bits, mode,
                                                                cache=cache))
                    rows.append(r)
                    if args.out:  # checkpoint after every row
                        atomic_write_json(args.out, dict(meta=meta, rows=rows))
                    print(f"{r['shape']:>10} b={m:<3} int{bits} {mode:<6} dense {dense:8.3f}  ref {r['ref']:8.3f}  "
                          f"cpu {r['cpu']:8.3f}  cached {r['cpu-cached']:8.3f} ms",
                          flush=True)
    meta["load_average_end"] = list(os.getloadavg())
    if args.out:
        atomic_write_json(args.out, dict(meta=meta, rows=rows))
    print(json.dumps(meta))
    print("\n| layer [out×in] | batch | bits | mode | dense fp32 | ref (dequant+mm) | cpu "
          "| cpu cached | ref / cpu |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['batch']} | {r['bits']} | {r['mode']} | {r['dense']:.3f} | {r['ref']:.3f} | "
              f"{r['cpu']:.3f} | {r['cpu-cached']:.3f} | {r['ref'] / r['cpu']:.1f}× |")
    print()
    print(summary_table(rows))


def summary_table(rows) -> str:
    """One line per (layer, batch, bits): ms per call, paper / nested."""
    by = {}
    for r in rows:
        by.setdefault((r["shape"], r["batch"], r["bits"]), {})[r["mode"]] = r
    lines = ["| layer [out×in] | batch | bits | dense fp32 | ref (paper / nested) | cpu (paper / nested) | "
             "cpu cached (nested) |", "|---|---|---|---|---|---|---|"]
    for (shape, m, bits), d in by.items():
        p, n = d["paper"], d["nested"]
        lines.append(f"| {shape} | {m} | {bits} | {n['dense']:.2f} | {p['ref']:.2f} / {n['ref']:.2f} | "
                     f"{p['cpu']:.2f} / {n['cpu']:.2f} | "
                     f"{n['cpu-cached']:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
