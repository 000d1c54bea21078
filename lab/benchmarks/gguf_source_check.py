"""GGUFSource (format/gguf_source.py) against load_model, and its memory reading a model one tensor at a time.

    python lab/benchmarks/gguf_source_check.py smollm2-135m qwen2.5-coder-0.5b gemma3-270m --dtypes float32 bfloat16
    python lab/benchmarks/gguf_source_check.py qwen2.5-coder-0.5b --memory-only

For every model: `identical` compares the config and every state-dict tensor of `load_model(spec, dtype)` with
`GGUFSource.get(name, dtype)` (bit for bit); `memory` runs, in a fresh process each, the source reading every tensor
one by one (a) as shipped and (b) with the mapped pages kept (no madvise), and reports the peak RSS over the
reading (the kernel's high-water mark, reset after the source is open) next to the largest tensor in float32 and the
file size. One JSON line per result to stdout and to `--out` (default: the work folder's gguf_source.jsonl).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _paths


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def _rss_parts() -> dict:
    parts = {}
    for field in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
        parts[field] = _status_kib(field) / 1024
    return parts


def identical(spec: str, dtypes: list[str]) -> list[dict]:
    import torch

    from matquant.models.loading import load_model
    from matquant.format.source import open_source

    t0 = time.perf_counter()
    src = open_source(spec)
    open_s = time.perf_counter() - t0
    rows = []
    for dtype_name in dtypes:
        dtype = getattr(torch, dtype_name)
        model = load_model(spec, dtype)[0]
        state = model.state_dict()
        cfg_model, cfg_src = model.config.to_dict(), src.config.to_dict()
        cfg_model.pop("dtype", None), cfg_src.pop("dtype", None)  # the source's config says float32
        names = src.names()
        t0 = time.perf_counter()
        bad = []
        for n in names:
            t = src.get(n, dtype)
            if not (t.dtype == state[n].dtype and torch.equal(t, state[n])):
                bad.append(n)
        get_s = time.perf_counter() - t0
        rows.append({"check": "identical", "spec": spec, "dtype": dtype_name, "tensors": len(names),
                     "mismatched": bad[:10], "n_mismatched": len(bad), "config_equal": cfg_model == cfg_src,
                     "only_in_model": sorted(set(state) - set(names)),
                     "only_in_source": sorted(set(names) - set(state)),
                     "open_s": round(open_s, 1), "get_all_s": round(get_s, 1)})
        del model, state
    return rows


def memory(spec: str, keep_pages: bool) -> dict:
    """In this process: open the source, reset the RSS high-water mark, read every tensor, report."""
    import torch

    from matquant.format.source import open_source

    src = open_source(spec)
    if keep_pages:
        src._release = lambda t: None  # the comparison: leave the mapped pages resident
    after_open = _rss_parts()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    largest = 0
    t0 = time.perf_counter()
    for name in src.names():
        t = src.get(name, torch.float32)
        largest = max(largest, t.numel() * t.element_size())
        del t
    read_s = time.perf_counter() - t0
    after = _rss_parts()
    return {"check": "memory", "spec": spec, "release_pages": not keep_pages, "tensors": len(src.names()),
            "file_mib": round(src.path.stat().st_size / 2**20, 1), "largest_fp32_mib": round(largest / 2**20, 1),
            "rss_after_open_mib": round(after_open["VmRSS"], 1),
            "peak_rss_reading_mib": round(after["VmHWM"], 1),
            "peak_over_open_mib": round(after["VmHWM"] - after_open["VmRSS"], 1),
            "rss_file_after_mib": round(after["RssFile"], 1), "rss_anon_after_mib": round(after["RssAnon"], 1),
            "read_all_s": round(read_s, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--dtypes", nargs="+", default=["float32"])
    ap.add_argument("--memory-only", action="store_true")
    ap.add_argument("--identical-only", action="store_true")
    ap.add_argument("--_memory-child", dest="memory_child", choices=["release", "keep"], help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    _paths.add_work_option(ap)
    args = ap.parse_args()
    if args.memory_child:
        print(json.dumps(memory(args.specs[0], keep_pages=args.memory_child == "keep")))
        return
    out = Path(args.out) if args.out else _paths.work_path("gguf_source.jsonl", work=args.work)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.specs:
        if not args.identical_only:
            for mode in ("release", "keep"):
                res = subprocess.run([sys.executable, __file__, spec, "--_memory-child", mode], check=True,
                                     capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
                rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
                print(json.dumps(rows[-1]), flush=True)
        if not args.memory_only:
            for row in identical(spec, args.dtypes):
                rows.append(row)
                print(json.dumps(row), flush=True)
    with open(out, "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
