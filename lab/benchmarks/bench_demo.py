"""Time `matquant demo` as a whole process (wall time, peak RSS via /usr/bin/time -v) and print a markdown row.

    python lab/benchmarks/bench_demo.py [--runs 1] [extra demo args, e.g. --method matgptq]

Also prints the demo's perplexity table (from its results.json) so both land in docs/benchmarks.md together.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=1)
    a, extra = ap.parse_known_args()
    a.extra = extra
    for i in range(a.runs):
        out = tempfile.mkdtemp(prefix="demo-bench-")
        cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "matquant", "demo", "--out", out, *a.extra]
        p = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, TQDM_DISABLE="1"))
        if p.returncode != 0:
            print(p.stdout[-3000:], p.stderr[-3000:])
            raise SystemExit(p.returncode)
        wall = re.search(r"Elapsed \(wall clock\) time.*: (.*)", p.stderr).group(1)
        rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
        res = json.loads(open(os.path.join(out, "results.json")).read())
        print(f"| {datetime.date.today()} | {platform.machine()}, {os.cpu_count()} cores | run {i + 1} | "
              f"wall {wall} | peak RSS {rss_kb / 2**20:.2f} GiB | checkpoint {res['checkpoint_bytes'] / 2**20:.1f} MiB"
              f" vs fp32 {res['fp32_model_bytes'] / 2**20:.1f} MiB | torch threads {res['threads']} |")
    print()
    print(open(os.path.join(out, "results.md")).read())


if __name__ == "__main__":
    main()
