"""Streaming quantization of random-weight models with real 7B shapes (issue 26): peak RSS and wall time of
`matquant quantize` at several depths, measured with /usr/bin/time -v in a fresh process per run.

Random weights measure memory and time, not quality. The models are made by make_random_model.py in the work folder
(bf16 safetensors shards) when missing.

    python lab/benchmarks/bench_stream_7b.py --layers 8 32 --runs rtn            # end to end
    python lab/benchmarks/bench_stream_7b.py --layers 8 --runs matgptq quality --blocks 2

`--blocks N` quantizes the targets of the first N blocks only (`--modules`), the other blocks being written as
read: the run's time minus the same depth's RTN run, divided by N, estimates one block's method time (an
extrapolation to the whole model, stated as such in docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _paths  # noqa: E402

RUNS = {
    "rtn": ["--method", "rtn"],
    "matgptq": ["--method", "matgptq"],
    "quality": ["--recipe", "quality"],
    "gptq": ["--method", "gptq"],
}


def timed(cmd: list[str], log: Path) -> dict:
    """Run `cmd` under /usr/bin/time -v; wall seconds, peak RSS (GiB) and the exit code."""
    t0 = time.time()
    with open(log, "w") as f:
        rc = subprocess.call(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT)
    text = log.read_text()
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"rc": rc, "wall_s": round(time.time() - t0, 1), "peak_rss_gib": round(int(m.group(1)) / 2**20, 3) if m
            else None}


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    _paths.add_work_option(ap, "the random models, checkpoints and results")
    ap.add_argument("--arch", default="llama2-7b", choices=["llama2-7b", "qwen2.5-7b"])
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--runs", nargs="+", default=["rtn"], choices=sorted(RUNS))
    ap.add_argument("--blocks", type=int, default=None, help="quantize the first N blocks only (method runs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints (default: delete after measuring)")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more `matquant quantize` flags")
    a = ap.parse_args(argv)
    work = _paths.work_path("stream7b", work=a.work)
    work.mkdir(parents=True, exist_ok=True)
    results = work / "results.jsonl"
    here = Path(__file__).resolve().parent
    for layers in a.layers:
        model = work / f"{a.arch}-{layers}L"
        if not (model / "config.json").exists():
            subprocess.check_call([sys.executable, str(here / "make_random_model.py"), "--arch", a.arch, "--layers",
                                   str(layers), "--out", str(model)])
        for run in a.runs:
            out = work / f"ckpt-{a.arch}-{layers}L-{run}"
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(out.with_name(out.name + ".stream-work"), ignore_errors=True)
            cmd = ["matquant", "quantize", *RUNS[run], "--model", str(model), "--out", str(out), "--threads",
                   str(a.threads), *a.extra]
            blocks = None
            if a.blocks and run != "rtn":
                blocks = a.blocks
                cmd += ["--modules", rf"model\.layers\.({'|'.join(map(str, range(blocks)))})\.mlp\.(gate|up|down)_proj"]
            r = timed(cmd, work / f"log-{a.arch}-{layers}L-{run}.txt")
            row = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "arch": a.arch, "layers": layers,
                   "run": run, "blocks_quantized": blocks or layers, "threads": a.threads,
                   "checkpoint_gib": round(folder_bytes(out) / 2**30, 3), "source_gib":
                   round(folder_bytes(model) / 2**30, 3), **r, "cmd": " ".join(cmd)}
            print(json.dumps(row), flush=True)
            with open(results, "a") as f:
                f.write(json.dumps(row) + "\n")
            if not a.keep:
                shutil.rmtree(out, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
