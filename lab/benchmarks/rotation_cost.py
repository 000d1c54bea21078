"""Cost of the online input rotation on CPU (issue 14): per decode token (batch 1), the transform x·V against the
layer it precedes, for SmolLM2's FFN shapes (gate/up: 576 -> 1536, down: 1536 -> 576), plus one whole-model decode
step of the real model with rotation none / input / block (timing only, see model_rows).

Times are CPU time of the (single) compute thread (`time.thread_time`), not wall time: on the shared 2-core
machine wall time mostly measures the wait for a core. Per layer: median µs of (a) the transform alone (`quant.rotation.InputRotation`, input mode = full randomized
Hadamard, block mode = H_64 per group), (b) the layer's forward without rotation and (c) with it, for the packed
int4 / int8 runtime (`backend='packed'`, the CPU default of matquant.load) and the dense fp32 reference. The
configurations are interleaved round by round in ONE process, so machine noise hits them alike. Whole model: RTN,
FFN, g64, nested int8 master, packed backend at int4 and int8, one decode step of a 128-token context (KV cache),
rotations toggled on the same layers round by round.

    OMP_NUM_THREADS=1 PYTHONPATH=src python lab/benchmarks/rotation_cost.py --out lab/results/rotation_cost.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch


CLOCK = time.thread_time  # CPU time of this thread (1 thread): waiting for a core on the shared machine not counted


def timed(fn, reps: int) -> float:
    fn()
    t0 = CLOCK()
    for _ in range(reps):
        fn()
    return (CLOCK() - t0) / reps * 1e6  # µs


def layer_rows(rounds: int, reps: int) -> list[dict]:
    from matquant.nn.linear import MatQuantLinear
    from matquant.quant.minmax import quantize_minmax
    from matquant.quant.rotation import input_rotation, make_spec

    torch.manual_seed(0)
    cases = {}
    for n, out in ((576, 1536), (1536, 576)):
        w = torch.randn(out, n) * 0.02
        x = torch.randn(1, 1, n)
        for mode in ("input", "block"):
            rot = input_rotation(make_spec(mode, 64), n)
            cases[(n, out, mode, "transform", "-")] = (lambda r=rot, x=x: r(x + 0.0))  # fresh tensor: no reuse
        for backend, bits in (("packed", 4), ("packed", 8), ("torch", 8)):
            for mode in ("none", "input", "block"):
                m = MatQuantLinear.from_quantized(quantize_minmax(w, 8, 64), None, slicing="nested")
                m.set_rotation(make_spec(mode, 64))
                m.set_backend(backend)
                m.set_bits(bits)
                label = "fp32 dense (torch ref)" if backend == "torch" else f"packed int{bits}"
                with torch.no_grad():
                    cases[(n, out, mode, "layer", label)] = (lambda m=m, x=x: m(x + 0.0))
    # the `x + 0.0` (a fresh input every call, so the transform's same-input reuse never kicks in) is in every case
    times = {k: [] for k in cases}
    with torch.no_grad():
        for _ in range(rounds):
            for k, fn in cases.items():
                times[k].append(timed(fn, reps))
    return [{"in": k[0], "out": k[1], "rotation": k[2], "what": k[3], "layer": k[4],
             "us_median": round(statistics.median(v), 2), "us_min": round(min(v), 2)} for k, v in times.items()]


def model_rows(rounds: int, steps: int) -> list[dict]:
    """One decode step of the real model (RTN FFN g64 codes, packed backend), each target layer running with no
    rotation, the input rotation or the block rotation (set_rotation on the same codes: only the time is measured
    here, the codes are the unrotated model's, so the outputs of the rotated variants are not meaningful)."""
    import matquant
    from matquant.algorithms import quantize_model
    from matquant.models.loading import load_model
    from matquant.nn.bits import matquant_modules
    from matquant.quant.rotation import make_spec

    m, tok, _ = load_model("smollm2-135m")
    quantize_model(m, "rtn", progress=False)
    matquant.set_backend(m, "packed", keep=[4, 8])
    layers = matquant_modules(m).values()
    ids = torch.randint(0, 49152, (1, 128), generator=torch.Generator().manual_seed(0))
    nxt = ids[:, -1:]
    out = []
    with torch.no_grad():
        for bits in (4, 8):
            matquant.set_bits(m, bits)
            cache = m(input_ids=ids, use_cache=True).past_key_values
            times = {k: [] for k in ("none", "input", "block")}
            for _ in range(rounds):
                for mode in times:
                    for layer in layers:
                        layer.set_rotation(make_spec(mode, 64))
                    m(input_ids=nxt, past_key_values=cache, use_cache=True)  # warm
                    cache.crop(-1)
                    t0 = CLOCK()
                    for _ in range(steps):
                        m(input_ids=nxt, past_key_values=cache, use_cache=True)
                        cache.crop(-1)  # drop the appended token: every step sees the same 128-token context
                    times[mode].append((CLOCK() - t0) / steps * 1e3)
            for mode, v in times.items():
                out.append({"model": "smollm2-135m, 90 FFN layers packed", "bits": bits, "rotation": mode,
                            "ms_per_token_median": round(statistics.median(v), 2), "ms_min": round(min(v), 2)})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--no-model", action="store_true")
    ap.add_argument("--no-layers", action="store_true")
    ap.add_argument("--merge", action="store_true", help="keep the other part already in --out")
    args = ap.parse_args()
    load0 = open("/proc/loadavg").read().split()[:3]
    rows = json.load(open(args.out)) if args.merge and os.path.exists(args.out) else {}
    if not args.no_layers:
        rows["layers"] = layer_rows(args.rounds, args.reps)
        for r in rows["layers"]:
            print(r, flush=True)
        with open(args.out, "w") as f:  # written part by part
            json.dump(rows, f, indent=1)
    if not args.no_model:
        rows["model_decode"] = model_rows(args.rounds, args.steps)
        for r in rows["model_decode"]:
            print(r, flush=True)
    rows["machine" + ("_model" if args.no_layers else "")] = {"threads": torch.get_num_threads(), "torch": torch.__version__,
                       "python": platform.python_version(), "cpu": platform.processor() or platform.machine(),
                       "loadavg_start": load0, "loadavg_end": open("/proc/loadavg").read().split()[:3],
                       "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
