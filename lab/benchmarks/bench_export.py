"""Measure every export: weight error vs the slice and the perplexity of the exported model as transformers reads
it (GGUF loader / compressed-tensors decompression), beside the slice's perplexity inside matquant. Same windows.

    python lab/benchmarks/bench_export.py CKPT --bits 8,6,5,4,3,2 --slicing nested,paper --formats gguf,gguf-k,ct \
        --windows 6            # rows -> WORK/export/results.jsonl

Formats: gguf (default types: Q4_1/Q5_1 exact, Q8_0 nearest), gguf-k (--k-quants), ct (compressed-tensors at r
bits), ct8 (compressed-tensors, r-bit slice in 8-bit codes). One JSON line per row is appended to --out.
WORK is the work folder (--work, else $MATQUANT_WORK, else ./matquant-work; lab/benchmarks/_paths.py).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path

import torch
from _paths import add_work_option, work_path


def weight_error(tensors) -> dict:
    """Aggregate over the quantized tensors: relative rms (sqrt Σerr² / Σref²), worst tensor, worst max abs."""
    num = sum(t.rms_error**2 * t.numel for t in tensors)
    den = sum((t.rms_error / t.rel_rms_error) ** 2 * t.numel for t in tensors if t.rel_rms_error > 0)
    return {"rel_rms": math.sqrt(num / den) if den else 0.0, "worst_rel_rms": max(t.rel_rms_error for t in tensors),
            "max_abs": max(t.max_error for t in tensors)}


def table(paths: list[str]) -> str:
    """Markdown rows from result files (later rows of the same configuration win)."""
    rows = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            r = json.loads(line)
            key = (r["checkpoint"], r["slicing"], str(r["bits"]), r["format"])
            if key not in rows or "ppl_export" in r or "ppl_export" not in rows[key]:
                rows[key] = r  # a row with a perplexity is never replaced by one without
    out = ["| checkpoint | slicing | r | format | stored as | exact? | bits/weight | weight rel. rms vs slice (worst "
           "tensor) | max abs | ppl in matquant | ppl exported | Δ |", "|" + "---|" * 12]
    for r in rows.values():
        kind = ("exact" if r.get("exact") else "nearest") if "error" not in r else "refused"
        stored = ", ".join(r.get("types", [])) or (f"{r['format']} ({100 * r.get('exact_groups', 0):.0f} % groups "
                                                   "exact)" if "error" not in r else r["error"][:80])
        ppl = (f"{r['ppl_matquant']:.3f} | {r['ppl_export']:.3f} | {100 * r['ppl_rel_diff']:+.3f} %"
               if "ppl_export" in r else "– | – | –")
        bpw = f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else "–"
        err = (f"{r['rel_rms']:.2e} ({r['worst_rel_rms']:.2e}) | {r['max_abs']:.1e}" if "rel_rms" in r else "– | –")
        out.append(f"| {Path(r['checkpoint']).name} | {r['slicing']} | {r['bits']} | {r['format']} | {stored} | {kind} "
                   f"| {bpw} | {err} | {ppl} |")
    return "\n".join(out)


def main(argv=None) -> int:
    import sys

    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--table":
        print(table(sys.argv[2:]))
        return 0
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--bits", default="8,6,5,4,3,2")
    p.add_argument("--bits-map", default=None, help="JSON bits map file (replaces --bits)")
    p.add_argument("--slicing", default="nested")
    p.add_argument("--formats", default="gguf,ct")
    p.add_argument("--windows", type=int, default=6)
    p.add_argument("--seqlen", type=int, default=2048)
    add_work_option(p, "the exported files (WORK/export/bench) and the default --out")
    p.add_argument("--keep", action="store_true", help="keep the exported files")
    p.add_argument("--skip-ppl", action="store_true", help="weight error only (no read-back, no perplexity)")
    p.add_argument("--out", default=None, help="JSONL rows (default: WORK/export/results.jsonl)")
    a = p.parse_args(argv)
    a.out = a.out or str(work_path("export", "results.jsonl", work=a.work))

    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from matquant.commands.common import load_bits_map
    from matquant.data import token_windows
    from matquant.eval.perplexity import perplexity
    from matquant.integrations.compressed_tensors_export import export_compressed_tensors, load_decompressed
    from matquant.integrations.export_slices import load_for_export
    from matquant.integrations.gguf_export import export_gguf
    from matquant.nn.bits import set_bits

    work = work_path("export", "bench", work=a.work)
    work.mkdir(parents=True, exist_ok=True)
    specs = [load_bits_map(a.bits_map)] if a.bits_map else [int(b) for b in a.bits.split(",")]
    model, tok, qcfg = load_for_export(a.checkpoint, 8)
    windows = token_windows(tok, "eval", a.seqlen, a.windows)
    base = {"checkpoint": str(a.checkpoint), "method": qcfg.method, "scope": qcfg.scope, "group_size": qcfg.group_size,
            "windows": int(windows.shape[0]), "seqlen": a.seqlen, "torch": torch.__version__,
            "machine": platform.machine(), "date": time.strftime("%Y-%m-%d")}
    for mode in a.slicing.split(","):
        for spec in specs:
            set_bits(model, spec, mode)
            t0 = time.time()
            ppl_mq = None if a.skip_ppl else perplexity(model, windows, progress=False).ppl
            label = spec if isinstance(spec, int) else os.path.basename(a.bits_map)
            print(f"[{mode} {label}] matquant ppl {ppl_mq} ({time.time() - t0:.0f}s)", flush=True)
            for fmt in a.formats.split(","):
                t0 = time.time()
                row = {**base, "slicing": mode, "bits": label, "format": fmt, "ppl_matquant": ppl_mq}
                try:
                    if fmt.startswith("gguf"):
                        out = work / f"m-{mode}-{label}-{fmt}.gguf"
                        rep = export_gguf(model, tok, out, k_quants=fmt == "gguf-k", overwrite=True)
                        row.update(types=sorted({f"{t.qtype}{'=' if t.exact else '~'}" for t in rep.tensors}),
                                   bits_per_weight=rep.bits_per_weight, file_mib=rep.file_bytes / 2**20,
                                   exact=all(t.exact for t in rep.tensors), **weight_error(rep.tensors))
                        back = None if a.skip_ppl else AutoModelForCausalLM.from_pretrained(
                            str(out.parent), gguf_file=out.name, dtype=torch.float32)
                    else:
                        out = work / f"m-{mode}-{label}-{fmt}"
                        rep = export_compressed_tensors(model, tok, out, dtype=torch.float32,
                                                        pack_bits=8 if fmt == "ct8" else None, overwrite=True)
                        mods = rep.modules
                        for m in mods:
                            m.numel = model.get_submodule(m.module).qweight.numel()
                        row.update(exact_groups=sum(m.exact_groups * m.numel for m in mods) / sum(m.numel for m in mods),
                                   exact=all(m.exact_groups == 1.0 for m in mods), file_mib=rep.weight_bytes / 2**20,
                                   bits_per_weight=rep.bits_per_weight,
                                   **weight_error(mods))
                        row["reader"] = "transformers" if rep.config_groups == 1 else "compressed-tensors per group"
                        back = None if a.skip_ppl else (AutoModelForCausalLM.from_pretrained(
                            str(out), dtype=torch.float32, quantization_config=CompressedTensorsConfig(dequantize=True))
                            if rep.config_groups == 1 else load_decompressed(out))
                    if back is not None:
                        row["ppl_export"] = perplexity(back.eval(), windows, progress=False).ppl
                        row["ppl_rel_diff"] = row["ppl_export"] / ppl_mq - 1
                    del back
                    if not a.keep:
                        shutil.rmtree(out, ignore_errors=True) if out.is_dir() else out.unlink(missing_ok=True)
                except Exception as e:  # record and go on: a refusal is a result too
                    row["error"] = f"{type(e).__name__}: {e}"
                row["seconds"] = round(time.time() - t0, 1)
                row["load"] = os.getloadavg()[0]
                print(json.dumps({k: v for k, v in row.items() if k not in base}), flush=True)
                with open(a.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
                gc.collect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
