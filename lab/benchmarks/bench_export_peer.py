"""Peer GGUFs (e.g. llama.cpp's own quantizations of the fp32 reference) through the SAME reader and perplexity code
as our exports: transformers' GGUF loader + matquant.eval.perplexity on the eval windows. Real bits per weight are
counted tensor by tensor from the file (FFN and attention projections separately: K-quants fall back on rows not
divisible by 256).

    python lab/benchmarks/bench_export_peer.py ref-Q4_1.gguf ref-Q4_K_M.gguf --windows 6 --out peer.jsonl
    python lab/benchmarks/bench_export_peer.py --model qwen2.5-coder-0.5b ref-all-Q8_0.gguf ...   # another model

`--model` (default: the embedded SmolLM2) names the model whose tokenizer cuts the eval text (any `--model` that
`matquant quantize` takes); every file scored in one call must share that tokenizer.

    python lab/benchmarks/bench_export_peer.py --table peer.jsonl ours.jsonl --fp32-ppl FP32_PPL   # markdown table

`--llamacpp` also runs llama.cpp's own `llama-perplexity -c 2048 --chunks N` on each file (its protocol scores the
second half of each chunk, so its absolute values differ from ours; compare files within one reader); it comes from
$MATQUANT_LLAMA_CPP, else PATH. --out defaults to WORK/export/peer.jsonl (WORK: --work, else $MATQUANT_WORK, else
./matquant-work); both settings: lab/benchmarks/_paths.py.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections import Counter
from pathlib import Path

import torch
from _paths import add_work_option, work_path


FFN_KEYS = ("ffn_gate", "ffn_up", "ffn_down")
ATTN_KEYS = ("attn_q.", "attn_k.", "attn_v.", "attn_output")


def real_bits(path) -> dict:
    """Bits per weight (8 · stored bytes / weights) of the ffn_* and attn_{q,k,v,output} weight matrices, of the two
    together (``linear``: every decoder linear layer, what a whole-model quantization covers), and the types used.
    Biases are 1-D F32 tensors named ``*.bias``; they are not weights of the matrices and are left out."""
    import gguf

    tensors = [t for t in gguf.GGUFReader(str(path)).tensors if t.name.endswith(".weight")]
    out = {}
    for part, keys in (("ffn", FFN_KEYS), ("attn", ATTN_KEYS), ("linear", FFN_KEYS + ATTN_KEYS)):
        ts = [t for t in tensors if any(k in t.name for k in keys)]
        n_weights = max(sum(int(t.n_elements) for t in ts), 1)
        out[f"{part}_bits_per_weight"] = 8 * sum(int(t.n_bytes) for t in ts) / n_weights
        out[f"{part}_types"] = dict(Counter(t.tensor_type.name for t in ts))
    return out


FP32_PPL = "fp32_ppl"  # key of the fp32 reference's perplexity in table(); it is ref-f32's (value: docs/export.md)


def describe(stem: str) -> tuple[str, str]:
    """(who made it, scope) from the file names the benchmark scripts write."""
    m = re.fullmatch(r"ref-(?:(all|ffn)-)?([A-Z0-9_]+?)(-im)?", stem)
    if stem == "ref-f32":
        return "fp32 reference (F32 GGUF)", "–"
    if m:
        return f"llama.cpp {m.group(2)}{' + imatrix' if m.group(3) else ''}", m.group(1) or "all"
    m = re.fullmatch(r"(rtn|mg|mga|q|qa|ba|baa|peer-ours)-(?:(g32|g64)-)?(int\d|map)(-k)?", stem)
    if m:  # mg/q/ba: MatGPTQ default / --recipe quality / --recipe balanced, FFN-only; mga/qa/baa: FFN+attention
        who = {"rtn": "RTN g64", "mg": "MatGPTQ g64", "mga": "MatGPTQ g64", "q": "quality recipe g64",
               "qa": "quality recipe g64", "ba": "balanced recipe g64", "baa": "balanced recipe g64",
               "peer-ours": f"RTN {m.group(2)}"}[m.group(1)]
        what = "3.0-bit Mix'n'Match map" if m.group(3) == "map" else m.group(3)
        scope = "all" if m.group(1) in ("mga", "qa", "baa") else "ffn"
        return f"matquant {who} {what}{' --k-quants' if m.group(4) else ''}", scope
    return stem, "?"


def table(paths: list[str], fp32_ppl: float, fp32_llama: float | None = None) -> str:
    """Markdown rows from result files, one row per file (a file's transformers and llama.cpp rows merged)."""
    rows: dict[str, dict] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            r = json.loads(line)
            rows.setdefault(Path(r["file"]).stem, {}).update({k: v for k, v in r.items() if v is not None})
    if fp32_llama is None and "ref-f32" in rows:
        fp32_llama = rows["ref-f32"].get("ppl_llamacpp")
    out = ["| file | scope | linear bits/weight | FFN bits/weight (types) | attention bits/weight (types) | file MiB "
           "| perplexity (transformers) | ÷ fp32 | llama-perplexity | ÷ fp32 |", "|" + "---|" * 10]

    def bits(r):  # the sort key: every linear layer when the row has it (newer rows), else the FFN
        return r.get("linear_bits_per_weight", r["ffn_bits_per_weight"])

    def types(counts):
        return ", ".join(f"{n} {t}" for t, n in sorted(counts.items(), key=lambda x: -x[1]))

    order = sorted(rows.items(), key=lambda kv: (describe(kv[0])[1], -bits(kv[1])))
    for stem, r in order:
        who, scope = describe(stem)
        linear = f"{r['linear_bits_per_weight']:.3f}" if "linear_bits_per_weight" in r else "–"
        attn = f"{r['attn_bits_per_weight']:.3f}" + (f" ({types(r['attn_types'])})" if "attn_types" in r else "")
        ppl = f"{r['ppl']:.3f} | {r['ppl'] / fp32_ppl:.3f}×" if "ppl" in r else "– | –"
        lp = (f"{r['ppl_llamacpp']:.3f} | " + (f"{r['ppl_llamacpp'] / fp32_llama:.3f}×" if fp32_llama else "–")
              if "ppl_llamacpp" in r else "– | –")
        out.append(f"| {who} | {scope} | {linear} | {r['ffn_bits_per_weight']:.3f} ({types(r['ffn_types'])}) | {attn} "
                   f"| {r['file_mib']:.1f} | {ppl} | {lp} |")
    return "\n".join(out)


def main(argv=None) -> int:
    import sys

    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--table":
        q = argparse.ArgumentParser()
        q.add_argument("--table", nargs="+", required=True, help="result JSONL files")
        q.add_argument("--fp32-ppl", type=float, required=True, help="the fp32 reference's perplexity, same reader")
        t = q.parse_args()
        print(table(t.table, t.fp32_ppl))
        return 0
    p = argparse.ArgumentParser()
    p.add_argument("files", nargs="+")
    p.add_argument("--model", default=None, help="the model whose tokenizer cuts the eval text (default: the "
                   "embedded SmolLM2; e.g. qwen2.5-coder-0.5b)")
    p.add_argument("--windows", type=int, default=6)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--out", default=None, help="JSONL rows (default: WORK/export/peer.jsonl)")
    add_work_option(p, "the default --out")
    p.add_argument("--llamacpp", action="store_true", help="also llama-perplexity on the eval text (1 thread)")
    p.add_argument("--chunks", type=int, default=6, help="llama-perplexity chunks of --seqlen tokens")
    p.add_argument("--skip-transformers", action="store_true", help="only llama-perplexity")
    a = p.parse_args(argv)
    a.out = a.out or str(work_path("export", "peer.jsonl", work=a.work))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    if a.llamacpp:
        from _paths import llama_tool

        llama_tool("llama-perplexity")  # fail now, not after the first file

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from matquant.data import token_windows
    from matquant.eval.perplexity import perplexity
    from matquant.models.loading import DEFAULT_MODEL, resolve_model

    windows = None
    if not a.skip_transformers:
        src = resolve_model(a.model or DEFAULT_MODEL)
        tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
        windows = token_windows(tok, "eval", a.seqlen, a.windows)
    for f in a.files:
        f = Path(f)
        t0 = time.time()
        row = {"file": str(f), "model": a.model or DEFAULT_MODEL, "file_mib": f.stat().st_size / 2**20,
               **real_bits(f), "seqlen": a.seqlen,
               "load": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d")}
        if windows is not None:
            m = AutoModelForCausalLM.from_pretrained(str(f.parent), gguf_file=f.name, dtype=torch.float32).eval()
            row.update(ppl=perplexity(m, windows, progress=False).ppl, windows=int(windows.shape[0]))
            del m
        row["seconds"] = round(time.time() - t0, 1)
        if a.llamacpp:
            from bench_export_llamacpp import llama_perplexity
            from matquant.data.text import get_text

            text = Path(a.out).parent / "eval.txt"
            if not text.exists():
                text.write_text(get_text("eval"))
            t1 = time.time()
            row.update(ppl_llamacpp=llama_perplexity(f, text, a.seqlen, a.chunks, 1),
                       llamacpp_chunks=a.chunks, llamacpp_seconds=round(time.time() - t1, 1))
        print(json.dumps(row), flush=True)
        with open(a.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
