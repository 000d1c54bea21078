"""How long a precision switch takes on the loaded SmolLM2-135M (CPU), per backend.

    PYTHONPATH=src python lab/benchmarks/bench_set_bits.py [--scope ffn+attn] [--threads 1] [--out FILE]

The model is the embedded SmolLM2-135M (dequantized Q4_1 GGUF, fp32: the "full precision" reference), RTN-quantized
to int8 master codes, group size 64. A switch is lazy: `set_bits` only records the new precision; the first
forward after it re-dequantizes every layer's weight. Measured (median, this thread's CPU time, 1 thread):
  set_bits        the `matquant.set_bits(model, r)` call itself
  redequant       re-dequantizing all quantized layers at the new precision (what the first forward pays extra)
  fwd-1tok        a steady-state forward of one token (context: the cost a switch is compared with)
  switch+fwd      set_bits to another precision + one-token forward, cpu backend with 3 cached precisions (warm)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import torch

import matquant
from matquant.algorithms import quantize_model
from matquant.kernels import cpu as kcpu
from matquant.models.loading import load_model
from matquant.nn import matquant_modules


def cpu_ms(fn, reps: int = 5) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        ts.append(time.thread_time() - t0)
    return statistics.median(ts) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scope", default="ffn+attn")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads != 1:
        raise SystemExit("--threads must be 1: the timer measures the calling thread's CPU time")
    torch.set_num_threads(1)
    model, _, _ = load_model("smollm2-135m")
    quantize_model(model, "rtn", master_bits=8, group_size=64, scope=args.scope, progress=False)
    mods = list(matquant_modules(model).values())
    n_weights = sum(m.qweight.numel() for m in mods)
    ids = torch.tensor([[1, 2, 3]])[:, :1]
    res = dict(meta=dict(date=datetime.date.today().isoformat(), threads=1, torch=torch.__version__,
                         scope=args.scope, layers=len(mods), quantized_weights=n_weights,
                         timer="thread CPU time, median", load_average=list(os.getloadavg())), rows=[])

    def fwd():
        with torch.no_grad():
            model(ids)

    for backend in ("torch", "cpu"):
        matquant.set_backend(model, backend, cache_precisions=1)
        for mode in ("paper", "nested"):
            for bits in (8, 4, 2):
                matquant.set_bits(model, bits, slicing=mode)
                sb = cpu_ms(lambda: matquant.set_bits(model, bits, slicing=mode))
                if backend == "torch":
                    def redeq():
                        for m in mods:
                            m._cached = None
                            m.dequantized_weight()
                else:
                    def redeq():
                        for m in mods:
                            m.compute_backend.clear()
                            m.compute_backend.weights.get((m.bits, m.slicing, torch.float32, m.qweight.device),
                                                          lambda m=m: kcpu.dequantize(
                                                              m.qweight, m.scales, m.zeros, m.master_bits, m.bits,
                                                              m.slicing))
                rd = cpu_ms(redeq, reps=3)
                fw = cpu_ms(fwd)
                row = dict(backend=backend, mode=mode, bits=bits, set_bits_ms=sb, redequant_ms=rd, fwd_1tok_ms=fw)
                res["rows"].append(row)
                print(json.dumps(row), flush=True)
    # warm per-precision cache: switching among 8/4/2 costs nothing extra
    matquant.set_backend(model, "cpu", cache_precisions=3)
    for mode in ("paper", "nested"):
        for b in (8, 4, 2):
            matquant.set_bits(model, b, slicing=mode)
            fwd()
        seq = iter([8, 4, 2] * 100)

        def switch_fwd():
            matquant.set_bits(model, next(seq), slicing=mode)
            fwd()
        row = dict(backend="cpu cache=3", mode=mode, bits="8→4→2 cycle", switch_fwd_ms=cpu_ms(switch_fwd, reps=9),
                   fwd_1tok_ms=cpu_ms(fwd))
        res["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.out:
        from matquant.format.atomic import atomic_write_json
        atomic_write_json(args.out, res)


if __name__ == "__main__":
    main()
