"""Streaming export of random-weight models with real 7B shapes (issue 26): peak RSS and wall time of
`matquant export --format gguf` of the int4 and int2 slices at several depths, measured with /usr/bin/time -v in a
fresh process per run, and llama.cpp loading each exported file (llama-perplexity over a few tokens).

Random weights measure memory and time, not quality: the perplexity llama.cpp reports for them means nothing. The
models are made by make_random_model.py and quantized with `matquant quantize --method rtn --scope ffn+attn` in the
work folder when missing (or pass --model / --checkpoint to reuse existing ones; their layer count is read from
config.json).

    python lab/benchmarks/bench_export_7b.py --layers 2 8 32                  # every depth, int4 and int2
    python lab/benchmarks/bench_export_7b.py --checkpoint CKPT2 CKPT8 --bits 4  # existing checkpoints
    MATQUANT_LLAMA_CPP=llama.cpp/build/bin python lab/benchmarks/bench_export_7b.py --layers 2

Rows go to WORK/bench_export_7b.jsonl (one JSON object per export) and are printed; `--keep` keeps the GGUF files
(they are deleted after the llama.cpp check by default: 4 GiB each at 32 layers).
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


def timed(cmd: list[str], log: Path, timeout: float | None = None) -> dict:
    """Run `cmd` under /usr/bin/time -v; wall seconds, CPU seconds (user + system: less sensitive than the wall
    time to other jobs on a shared machine), peak RSS (GiB) and the exit code."""
    t0 = time.time()
    with open(log, "w") as f:
        try:
            rc = subprocess.call(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = "timeout"
    text = log.read_text(errors="replace")
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    cpu = [float(x) for x in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", text)]
    return {"rc": rc, "wall_s": round(time.time() - t0, 1), "cpu_s": round(sum(cpu), 1) if cpu else None,
            "peak_rss_gib": round(int(m.group(1)) / 2**20, 3) if m else None}


def folder_bytes(p: Path) -> int:
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


def llama_cpp_check(gguf_path: Path, log: Path, work: Path, threads: int) -> dict:
    """llama.cpp loads the file and runs it: llama-perplexity over two 64-token chunks of a short text (random
    weights: the perplexity means nothing; the point is that llama.cpp reads the metadata, tokenizer and tensors)."""
    try:
        tool = _paths.llama_tool("llama-perplexity")
    except _paths.LlamaCppNotFound as e:
        return {"llama_cpp": f"skipped: {e}"}
    text = work / "llamacpp-text.txt"
    if not text.exists():
        text.write_text("The quick brown fox jumps over the lazy dog near the river bank. " * 60)
    cmd = [str(tool), "-m", str(gguf_path), "-f", str(text), "-c", "64", "--chunks", "2", "-t", str(threads)]
    r = timed(cmd, log, timeout=1800)
    ppl = re.search(r"Final estimate: PPL = ([\d.]+)", log.read_text(errors="replace"))
    return {"llama_cpp_rc": r["rc"], "llama_cpp_wall_s": r["wall_s"], "llama_cpp_peak_rss_gib": r["peak_rss_gib"],
            "llama_cpp_ppl_random_weights": float(ppl.group(1)) if ppl else None, "llama_cpp_cmd": " ".join(cmd)}


def layers_of(folder: Path) -> int:
    return int(json.loads((folder / "config.json").read_text())["num_hidden_layers"])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="llama2-7b", help="make_random_model.py architecture (default llama2-7b)")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8, 32], help="depths to measure (default 2 8 32)")
    ap.add_argument("--model", default=None, help="an existing random model folder (one depth: its own)")
    ap.add_argument("--checkpoint", nargs="+", default=None,
                    help="existing matquant checkpoint(s) to export (each at its own depth)")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2], help="slices to export (default 4 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--keep", action="store_true", help="keep the exported GGUF files")
    ap.add_argument("--no-llama-cpp", action="store_true", help="skip the llama.cpp check")
    ap.add_argument("--results", default=None, help="JSONL results file (default WORK/bench_export_7b.jsonl)")
    _paths.add_work_option(ap)
    a = ap.parse_args(argv)
    work = _paths.work_dir(a.work)
    work.mkdir(parents=True, exist_ok=True)
    results = Path(a.results) if a.results else work / "bench_export_7b.jsonl"
    here = Path(__file__).resolve().parent
    env_threads = {"OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads)}
    import os

    env = {**os.environ, **env_threads}
    if a.checkpoint:
        targets = [(None, Path(c), layers_of(Path(c))) for c in a.checkpoint]
    elif a.model:
        targets = [(Path(a.model), None, layers_of(Path(a.model)))]
    else:
        targets = [(None, None, n) for n in a.layers]
    for model, ckpt, layers in targets:
        if ckpt is None:
            model = model or work / f"random-{a.arch}-{layers}L"
            if not model.exists():
                subprocess.check_call([sys.executable, str(here / "make_random_model.py"), "--arch", a.arch,
                                       "--layers", str(layers), "--out", str(model)], env=env)
            ckpt = work / f"ckpt-{model.name}-rtn"
            if not ckpt.exists():
                q = timed([sys.executable, "-m", "matquant", "quantize", "--method", "rtn", "--scope", "ffn+attn",
                           "--model", str(model), "--out", str(ckpt)], work / f"log-quantize-{model.name}.txt")
                if q["rc"] != 0:
                    print(f"quantize failed: {q}; see {work / f'log-quantize-{model.name}.txt'}", file=sys.stderr)
                    return 1
        for bits in a.bits:
            out = work / f"{ckpt.name}-int{bits}.gguf"
            if out.exists():
                out.unlink()
            cmd = [sys.executable, "-m", "matquant", "export", str(ckpt), "--bits", str(bits), "--format", "gguf",
                   "--out", str(out)]
            log = work / f"log-export-{ckpt.name}-int{bits}.txt"
            r = timed(cmd, log)
            row = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "arch": a.arch, "layers": layers,
                   "bits": bits, "threads": a.threads, "checkpoint_gib": round(folder_bytes(ckpt) / 2**30, 3),
                   "gguf_gib": round(folder_bytes(out) / 2**30, 3), **r, "cmd": " ".join(cmd)}
            summary = [ln for ln in log.read_text(errors="replace").splitlines() if ln.startswith(("wrote", "  "))]
            row["summary"] = summary[:4]
            if r["rc"] == 0 and not a.no_llama_cpp:
                row.update(llama_cpp_check(out, work / f"log-llamacpp-{ckpt.name}-int{bits}.txt", work, a.threads))
            print(json.dumps(row), flush=True)
            with open(results, "a") as f:
                f.write(json.dumps(row) + "\n")
            if not a.keep and out.exists():
                out.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
