"""llama.cpp itself on our exported GGUF files: perplexity (llama-perplexity) and speed (llama-bench).

Like for like: the exported file and a dense F32 GGUF of the SAME slice (export_gguf(dense='F32')) go through
llama-perplexity with the same text, context and chunks, so the difference is the GGML encoding alone.

    python lab/benchmarks/bench_export_llamacpp.py CKPT --bits 4,2 --chunks 6 --ctx 2048  # WORK/export/llamacpp.jsonl

llama-perplexity and llama-bench come from $MATQUANT_LLAMA_CPP, else PATH; WORK is the work folder (--work, else
$MATQUANT_WORK, else ./matquant-work). Both settings: lab/benchmarks/_paths.py.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import time
from pathlib import Path

from _paths import add_work_option, llama_tool, work_path


def llama_perplexity(model: Path, text: Path, ctx: int, chunks: int, threads: int) -> float:
    out = subprocess.run([str(llama_tool("llama-perplexity")), "-m", str(model), "-f", str(text), "-c", str(ctx),
                          "--chunks", str(chunks), "-t", str(threads), "-b", str(min(ctx, 2048))],
                         capture_output=True, text=True, check=True)
    m = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
    if not m:
        raise RuntimeError(f"llama-perplexity printed no estimate:\n{(out.stdout + out.stderr)[-2000:]}")
    return float(m.group(1))


def llama_bench(model: Path, threads: int) -> dict:
    out = subprocess.run([str(llama_tool("llama-bench")), "-m", str(model), "-t", str(threads), "-p", "128",
                          "-n", "32", "-r", "2", "-o", "json"], capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    return {("pp" if r["n_prompt"] else "tg"): r["avg_ts"] for r in rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--bits", default="4")
    p.add_argument("--slicing", default=None)
    p.add_argument("--k-quants", action="store_true")
    p.add_argument("--ctx", type=int, default=2048)
    p.add_argument("--chunks", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    add_work_option(p, "the GGUF files (WORK/export/llamacpp) and the default --out")
    p.add_argument("--no-bench", action="store_true")
    p.add_argument("--out", default=None, help="JSONL rows (default: WORK/export/llamacpp.jsonl)")
    a = p.parse_args(argv)
    a.out = a.out or str(work_path("export", "llamacpp.jsonl", work=a.work))
    for tool in ("llama-perplexity",) + (() if a.no_bench else ("llama-bench",)):
        llama_tool(tool)  # fail now, not after the exports

    from matquant.data.text import get_text
    from matquant.integrations.export_slices import load_for_export
    from matquant.integrations.gguf_export import export_gguf
    from matquant.nn.bits import set_bits

    work = work_path("export", "llamacpp", work=a.work)
    work.mkdir(parents=True, exist_ok=True)
    text = work / "eval.txt"
    text.write_text(get_text("eval"))
    model, tok, qcfg = load_for_export(a.checkpoint, 8, a.slicing)
    for bits in (int(b) for b in a.bits.split(",")):
        set_bits(model, bits, a.slicing)
        tag = f"{Path(a.checkpoint).name}-{qcfg.slicing if a.slicing is None else a.slicing}-int{bits}"
        q = work / f"{tag}{'-k' if a.k_quants else ''}.gguf"
        d = work / f"{tag}-f32.gguf"
        rq = export_gguf(model, tok, q, k_quants=a.k_quants, overwrite=True)
        export_gguf(model, tok, d, overwrite=True, dense="F32")
        row = {"checkpoint": a.checkpoint, "bits": bits, "k_quants": a.k_quants, "ctx": a.ctx, "chunks": a.chunks,
               "types": sorted({t.qtype for t in rq.tensors}), "bits_per_weight": rq.bits_per_weight,
               "file_mib": rq.file_bytes / 2**20, "date": time.strftime("%Y-%m-%d %H:%M"),
               "load_before": os.getloadavg()[0]}
        row["ppl_llamacpp_export"] = llama_perplexity(q, text, a.ctx, a.chunks, a.threads)
        row["ppl_llamacpp_f32_slice"] = llama_perplexity(d, text, a.ctx, a.chunks, a.threads)
        row["ppl_rel_diff"] = row["ppl_llamacpp_export"] / row["ppl_llamacpp_f32_slice"] - 1
        if not a.no_bench:
            row["tokens_per_s_export"] = llama_bench(q, a.threads)
            row["tokens_per_s_f32"] = llama_bench(d, a.threads)
        row["load_after"] = os.getloadavg()[0]
        print(json.dumps(row), flush=True)
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
