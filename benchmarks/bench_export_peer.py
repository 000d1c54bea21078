"""Peer GGUFs (e.g. llama.cpp's own quantizations of the fp32 reference) through the SAME reader and perplexity code
as our exports: transformers' GGUF loader + matquant.eval.perplexity on the eval windows. Real bits per weight are
counted tensor by tensor from the file (FFN and attention projections separately: K-quants fall back on rows not
divisible by 256).

    python benchmarks/bench_export_peer.py ref-Q4_1.gguf ref-Q4_K_M.gguf --windows 6 --out peer.jsonl
"""
from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

import torch


def real_bits(path) -> dict:
    """Bits per weight of the ffn_* and attn_{q,k,v,output} tensors as stored, and the types used."""
    import gguf

    out = {}
    for part, keys in (("ffn", ("ffn_gate", "ffn_up", "ffn_down")),
                       ("attn", ("attn_q.", "attn_k.", "attn_v.", "attn_output"))):
        ts = [t for t in gguf.GGUFReader(str(path)).tensors if any(k in t.name for k in keys)]
        out[f"{part}_bits_per_weight"] = 8 * sum(int(t.n_bytes) for t in ts) / max(sum(int(t.n_elements) for t in ts), 1)
        out[f"{part}_types"] = dict(Counter(t.tensor_type.name for t in ts))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("files", nargs="+")
    p.add_argument("--windows", type=int, default=6)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--out", default="/work/artifacts/export/peer.jsonl")
    a = p.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from matquant.data import token_windows
    from matquant.eval.perplexity import perplexity
    from matquant.models.loading import DEFAULT_MODEL, embedded_model_source

    src = embedded_model_source(DEFAULT_MODEL)
    tok = AutoTokenizer.from_pretrained(src.path, gguf_file=src.gguf_file)
    windows = token_windows(tok, "eval", a.seqlen, a.windows)
    for f in a.files:
        f = Path(f)
        t0 = time.time()
        m = AutoModelForCausalLM.from_pretrained(str(f.parent), gguf_file=f.name, dtype=torch.float32).eval()
        row = {"file": str(f), "file_mib": f.stat().st_size / 2**20, **real_bits(f),
               "ppl": perplexity(m, windows, progress=False).ppl, "windows": int(windows.shape[0]),
               "seqlen": a.seqlen, "seconds": round(time.time() - t0, 1), "load": os.getloadavg()[0],
               "date": time.strftime("%Y-%m-%d")}
        print(json.dumps(row), flush=True)
        with open(a.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        del m
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
