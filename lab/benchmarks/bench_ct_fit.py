"""compressed-tensors zero-point fit (issue 13): the same slice exported with each `--zero-fit`, weight error vs
the slice (decompressed by compressed-tensors) and perplexity of the folder as transformers reads it (dequantized),
same windows as bench_export.py.

    python lab/benchmarks/bench_ct_fit.py CKPT --bits 4 --fits search,lsq --windows 6   # rows -> WORK/ct_fit.jsonl

WORK is the work folder (--work, else $MATQUANT_WORK, else ./matquant-work; lab/benchmarks/_paths.py).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from _paths import add_work_option, work_path


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--fits", default="search,lsq")
    p.add_argument("--windows", type=int, default=6)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--skip-ppl", action="store_true")
    add_work_option(p, "the exported folders (WORK/ct_fit) and the default --out")
    p.add_argument("--out", default=None, help="JSONL rows (default: WORK/ct_fit.jsonl)")
    a = p.parse_args(argv)
    scratch = work_path("ct_fit", work=a.work)
    out_file = Path(a.out) if a.out else work_path("ct_fit.jsonl", work=a.work)
    out_file.parent.mkdir(parents=True, exist_ok=True)

    from bench_export import weight_error
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    from matquant.data import token_windows
    from matquant.eval.perplexity import perplexity
    from matquant.integrations.compressed_tensors_export import export_compressed_tensors
    from matquant.integrations.export_slices import load_for_export

    model, tok, qcfg = load_for_export(a.checkpoint, a.bits)
    windows = None if a.skip_ppl else token_windows(tok, "eval", a.seqlen, a.windows)
    for fit in a.fits.split(","):
        out = scratch / f"{Path(a.checkpoint).name}-int{a.bits}-{fit}"
        t0 = time.time()
        rep = export_compressed_tensors(model, tok, out, dtype=torch.float16, overwrite=True, fit=fit)
        mods = [SimpleNamespace(rms_error=m.rms_error, rel_rms_error=m.rel_rms_error, max_error=m.max_error,
                                numel=model.get_submodule(m.module).qweight.numel()) for m in rep.modules]
        row = {"checkpoint": a.checkpoint, "bits": a.bits, "fit": fit, "slicing": qcfg.slicing,
               "bits_per_weight": rep.bits_per_weight, **weight_error(mods), "export_s": round(time.time() - t0, 1),
               "date": time.strftime("%Y-%m-%d %H:%M"), "load": os.getloadavg()[0]}
        if windows is not None:
            back = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32,
                                                        quantization_config=CompressedTensorsConfig(dequantize=True))
            row.update(ppl_export=perplexity(back.eval(), windows, progress=False).ppl,
                       windows=int(windows.shape[0]), seqlen=a.seqlen)
            del back
        print(json.dumps(row), flush=True)
        with open(out_file, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        shutil.rmtree(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
