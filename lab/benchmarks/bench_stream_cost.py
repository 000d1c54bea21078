"""What streaming costs: `matquant quantize` streamed (the default) vs `--in-memory`, interleaved A B A B in one run,
each run measured with /usr/bin/time -v (wall time, CPU time = user + sys, peak RSS).

    python lab/benchmarks/bench_stream_cost.py --work DIR --model smollm2-135m --case quality=--recipe=quality \\
        --case rtn=--method=rtn --reps 2 --threads 2

A case is NAME=FLAGS (FLAGS split like a shell line; '=' inside a flag works too). `--flags` adds flags to every
run (e.g. a smaller calibration set or --modules). Each run writes its checkpoint to WORK/stream-cost/NAME-PIPELINE
(replaced every repetition), its log beside it, and one JSON row to WORK/stream-cost/runs.jsonl; the summary table
(medians per case and pipeline, and streamed / in-memory) is printed at the end. matquant is whatever is importable
(put a frozen snapshot on PYTHONPATH to measure a fixed commit while the tree changes).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _paths  # noqa: E402

PIPELINES = {"streamed": [], "in-memory": ["--in-memory"]}
TIME_FIELDS = {"user_s": "User time (seconds)", "sys_s": "System time (seconds)",
               "peak_rss_kb": "Maximum resident set size (kbytes)"}


def parse_time_v(text: str) -> dict:
    """The fields of /usr/bin/time -v's report that this benchmark uses."""
    out = {}
    for key, label in TIME_FIELDS.items():
        m = re.search(rf"^\s*{re.escape(label)}: ([0-9.]+)\s*$", text, re.M)
        if m is None:
            raise RuntimeError(f"/usr/bin/time -v printed no '{label}' line; is it GNU time?")
        out[key] = float(m.group(1))
    return out


def run_once(work: Path, case: str, flags: list[str], pipeline: str, common: list[str]) -> dict:
    out = work / f"{case}-{pipeline}"
    shutil.rmtree(out, ignore_errors=True)
    report = work / f"{case}-{pipeline}.time"
    cmd = ["/usr/bin/time", "-v", "-o", str(report), sys.executable, "-m", "matquant", "quantize", *flags,
           *common, *PIPELINES[pipeline], "--out", str(out), "--overwrite"]
    t0 = time.time()
    with open(work / f"{case}-{pipeline}.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONHASHSEED": "0"}).returncode
    wall = time.time() - t0
    if rc != 0:
        raise SystemExit(f"{case} {pipeline} failed (exit {rc}); see {work / f'{case}-{pipeline}.log'}")
    t = parse_time_v(report.read_text())
    load1 = os.getloadavg()[0]
    return {"case": case, "pipeline": pipeline, "cmd": cmd[4:], "wall_s": round(wall, 1),
            "cpu_s": round(t["user_s"] + t["sys_s"], 1), "user_s": t["user_s"], "sys_s": t["sys_s"],
            "peak_rss_gib": round(t["peak_rss_kb"] / 2**20, 3), "load1_after": round(load1, 2),
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}


def summary(rows: list[dict]) -> str:
    lines = ["| case | pipeline | runs | wall s (median) | CPU s (median) | peak RSS GiB (max) |",
             "|---|---|---|---|---|---|"]
    for case in dict.fromkeys(r["case"] for r in rows):
        med = {}
        for pipeline in PIPELINES:
            rs = [r for r in rows if r["case"] == case and r["pipeline"] == pipeline]
            if not rs:
                continue
            med[pipeline] = (statistics.median(r["wall_s"] for r in rs), statistics.median(r["cpu_s"] for r in rs))
            lines.append(f"| {case} | {pipeline} | {len(rs)} | {med[pipeline][0]:.0f} | {med[pipeline][1]:.0f} | "
                         f"{max(r['peak_rss_gib'] for r in rs):.2f} |")
        if len(med) == 2:
            a, b = med["streamed"], med["in-memory"]
            lines.append(f"| {case} | streamed / in-memory | | {a[0] / b[0]:.3f} | {a[1] / b[1]:.3f} | |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _paths.add_work_option(p, "the checkpoints, logs and runs.jsonl (under stream-cost/)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--case", action="append", required=True, metavar="NAME=FLAGS",
                   help="a quantize configuration, e.g. rtn=--method=rtn (repeatable)")
    p.add_argument("--reps", type=int, default=2, help="repetitions of each pipeline per case (default 2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--flags", default="", help="more flags for every run, e.g. '--calib-windows 8'")
    args = p.parse_args(argv)
    if not Path("/usr/bin/time").exists():
        raise SystemExit("this benchmark needs GNU time at /usr/bin/time (apt-get install time)")
    cases = []
    for spec in args.case:
        name, eq, flags = spec.partition("=")
        if not eq or not name:
            raise SystemExit(f"--case takes NAME=FLAGS, got {spec!r}")
        cases.append((name, [f for part in shlex.split(flags)
                            for f in (part.split("=", 1) if part.startswith("--") else [part])]))
    work = _paths.work_path("stream-cost", work=args.work)
    work.mkdir(parents=True, exist_ok=True)
    common = ["--model", args.model, "--threads", str(args.threads), *shlex.split(args.flags)]
    rows = []
    for name, flags in cases:
        for rep in range(args.reps):
            for pipeline in PIPELINES:  # A B A B
                row = run_once(work, name, flags, pipeline, common) | {"rep": rep}
                rows.append(row)
                with open(work / "runs.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{name} {pipeline} rep {rep}: {row['wall_s']:.0f}s wall, {row['cpu_s']:.0f}s CPU, "
                      f"{row['peak_rss_gib']:.2f} GiB peak RSS (load {row['load1_after']})", flush=True)
    print(summary(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
