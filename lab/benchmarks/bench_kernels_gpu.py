"""GPU benchmark of one quantized linear call (issue 6): µs per call and fraction of the measured copy bandwidth.

    PYTHONPATH=src python lab/benchmarks/bench_kernels_gpu.py [--shapes 4096x4096 14336x4096 4096x14336]
        [--batches 1 4 16] [--group-size 128] [--out lab/results/kernels_gpu.json] [--tune-cache FILE]

The tuned configs written to --tune-cache are what MATQUANT_TRITON_CONFIGS=FILE (or
matquant.kernels.triton_gemv.load_configs(FILE)) makes the triton backend use at run time.

Side by side in one run (shapes are [out × in]):
  fp16      cuBLAS F.linear on an fp16 weight
  tinygemm  torch._weight_int4pack_mm (int4, bf16 activations; the int4 paper/nested slice of the master codes)
  gemlite   GemLite A16W8 / A16W4 / A16W2 (fp16; our slices mapped by kernels.third_party)
  ours      matquant's Triton kernel for r ∈ {2,3,4,6,8}, slicing paper / nested, from the uint8
            master codes

Method: each method gets several copies of its weights (together > 4× the L2 cache), and a CUDA graph of
`--calls` calls cycling through the copies is replayed, so neither L2 residency nor Python launch cost is measured.
Every method's output is first checked against the fp32 reference of the slice it computes (max error relative
to max |y|); a failing method is reported as such and not timed. Roofline fraction = (bytes the method must read:
codes at its bits + scales/zeros + activations + output) / time / copy bandwidth, the latter measured here with a
large device-to-device copy.

Without CUDA this prints a message and exits with status 2 (`--dry-run-cpu` exercises the logic on tiny shapes
with the Triton interpreter and wall-clock timing; its numbers mean nothing).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

SERVED_BITS = (2, 3, 4, 6, 8)
L2_BYTES = 50 * 2**20  # H100; copies are sized against 4× this


def parse_shape(s: str) -> tuple[int, int]:
    try:
        out_f, in_f = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape {s!r} must look like OUTxIN, e.g. 14336x4096") from None
    return out_f, in_f


def build_parser():
    ap = argparse.ArgumentParser(description="GPU benchmark of MatQuant kernels vs cuBLAS, tinygemm and GemLite.")
    ap.add_argument("--shapes", type=parse_shape, nargs="+",
                    default=[(4096, 4096), (14336, 4096), (4096, 14336)])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--bits", type=int, nargs="+", default=list(SERVED_BITS))
    ap.add_argument("--modes", nargs="+", default=["paper", "nested"])
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--calls", type=int, default=50, help="kernel calls per CUDA graph")
    ap.add_argument("--replays", type=int, default=20)
    ap.add_argument("--skip", nargs="*", default=[], choices=["fp16", "tinygemm", "gemlite", "ours"])
    ap.add_argument("--tune-cache", default=None, help="JSON file caching the best Triton config per case")
    ap.add_argument("--out", default=None, help="JSON file for the raw numbers")
    ap.add_argument("--dry-run-cpu", action="store_true", help="tiny shapes on CPU via TRITON_INTERPRET=1")
    return ap


# ---------------------------------------------------------------- timing
class Timer:
    def __init__(self, device: str, calls: int, replays: int):
        self.device, self.calls, self.replays = device, calls, replays

    def us_per_call(self, fns) -> float:
        """fns: one zero-arg callable per weight copy; calls cycle through them."""
        seq = [fns[i % len(fns)] for i in range(self.calls)]
        for f in fns:  # warm-up: compile / autotune outside the graph
            f()
        if self.device != "cuda":
            t0 = time.perf_counter()
            for f in seq:
                f()
            return (time.perf_counter() - t0) / len(seq) * 1e6
        torch.cuda.synchronize()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for f in seq[:3]:
                f()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for f in seq:
                f()
        g.replay()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(self.replays):
            g.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3 / (self.replays * len(seq))


def copy_bandwidth(device: str) -> float:
    """Bytes/s of a large device-to-device copy (read + write counted)."""
    if device != "cuda":
        return float("nan")
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    reps = 20
    start.record()
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    bw = 2 * n * reps / (start.elapsed_time(end) / 1e3)
    del src, dst
    return bw


# ---------------------------------------------------------------- methods
def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def n_copies(bytes_per_copy: int, device: str) -> int:
    if device != "cuda":
        return 2
    return max(2, min(64, math.ceil(4 * L2_BYTES / max(bytes_per_copy, 1))))


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.dry_run_cpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        device = "cpu"
        args.shapes, args.batches, args.calls = [(40, 128)], [1, 4], 2
        args.group_size = min(args.group_size, 64)
        args.skip = sorted(set(args.skip) | {"tinygemm", "gemlite"})
    elif not torch.cuda.is_available():
        print("bench_kernels_gpu.py needs CUDA: no CUDA device is visible to torch "
              f"({torch.__version__}). Run it on a GPU machine (pip install triton gemlite there), or pass "
              "--dry-run-cpu to check the script logic on CPU.", file=sys.stderr)
        return 2
    else:
        device = "cuda"

    from matquant.kernels import cpu, torch_ref  # noqa: F401
    from matquant.kernels import third_party as tp
    from matquant.kernels import triton_gemv as tg

    timer = Timer(device, args.calls, args.replays)
    bw = copy_bandwidth(device)
    tune = {}
    if args.tune_cache and os.path.exists(args.tune_cache):
        with open(args.tune_cache) as f:
            tune = json.load(f)
    meta = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name() if device == "cuda"
                else "cpu (dry run)", torch=torch.__version__, copy_bw_GBs=bw / 1e9, group_size=args.group_size,
                calls_per_graph=args.calls, replays=args.replays)
    try:
        import triton
        meta["triton"] = triton.__version__
    except ImportError:
        pass
    print(json.dumps(meta), flush=True)
    rows = []
    gs = args.group_size

    def record(shape, m, method, bits, mode, us, nbytes, err, note=""):
        r = dict(shape=f"{shape[0]}x{shape[1]}", batch=m, method=method, bits=bits, mode=mode, us=us,
                 roofline=(nbytes / (us * 1e-6) / bw) if (us and bw == bw) else None, rel_err=err, note=note)
        rows.append(r)
        roof = f"{r['roofline']:.0%}" if r["roofline"] is not None else "-"
        us_s = f"{us:8.1f}" if us else "       -"
        print(f"{r['shape']:>11} b={m:<2} {method:<16} r={bits} {mode or '':<6} {us_s} µs  roof {roof:>5}  "
              f"err {err if err is None else f'{err:.1e}'} {note}", flush=True)

    for out_f, in_f in args.shapes:
        torch.manual_seed(0)
        w = torch.randn(out_f, in_f, device=device) * 0.02
        from matquant.quant.minmax import quantize_minmax
        qw = quantize_minmax(w, 8, gs)
        n_groups = in_f // gs
        param_bytes = out_f * n_groups * 2 * 2  # fp16 scale + zero
        for m in args.batches:
            x16 = torch.randn(m, in_f, device=device, dtype=torch.float16)
            io_bytes = (m * in_f + m * out_f) * 2
            # ---- fp16 cuBLAS
            if "fp16" not in args.skip:
                w16 = w.half()
                ref = x16.float() @ w16.float().t()
                copies = [w16.clone() for _ in range(n_copies(w16.numel() * 2, device))]
                err = rel_err(F.linear(x16, w16), ref)
                us = timer.us_per_call([lambda c=c: F.linear(x16, c) for c in copies])
                record((out_f, in_f), m, "fp16-cublas", 16, None, us, w16.numel() * 2 + io_bytes, err)
                del copies
            for mode in args.modes:
                refs = {}
                for bits in args.bits:
                    wr = torch_ref.dequantize_slice(qw.codes, qw.scales, qw.zeros, 8, bits, mode, torch.float16)
                    refs[bits] = x16.float() @ wr.float().t()
                # ---- tinygemm int4 (bf16)
                if "tinygemm" not in args.skip and 4 in args.bits:
                    try:
                        q4, sz = tp.tinygemm_int4_inputs(qw.codes, qw.scales, qw.zeros, 8, mode)
                        packed4 = tp.tinygemm_pack_cuda(q4)
                        xb = x16.bfloat16()
                        refb = xb.float() @ torch_ref.dequantize_slice(qw.codes, qw.scales, qw.zeros, 8, 4, mode,
                                                                       torch.bfloat16).float().t()
                        err = rel_err(torch._weight_int4pack_mm(xb, packed4, gs, sz), refb)
                        if err > 2e-2:
                            raise RuntimeError(f"wrong result (rel err {err:.2e}); check tinygemm packing order")
                        nb = packed4.numel() * packed4.element_size() + sz.numel() * 2
                        copies = [(packed4.clone(), sz.clone()) for _ in range(n_copies(nb, device))]
                        us = timer.us_per_call([lambda c=c: torch._weight_int4pack_mm(xb, c[0], gs, c[1])
                                                for c in copies])
                        record((out_f, in_f), m, "tinygemm-int4", 4, mode, us, nb + io_bytes, err)
                        del copies
                    except Exception as e:  # noqa: BLE001 - report and go on
                        record((out_f, in_f), m, "tinygemm-int4", 4, mode, None, 0, None, f"FAILED: {e}")
                # ---- GemLite W8/W4/W2
                if "gemlite" not in args.skip:
                    for bits in [b for b in args.bits if b in tp.GEMLITE_BITS]:
                        try:
                            layer = tp.make_gemlite_linear(qw.codes, qw.scales, qw.zeros, 8, bits, mode, gs)
                            err = rel_err(layer(x16), refs[bits])
                            if err > 2e-2:
                                raise RuntimeError(f"wrong result (rel err {err:.2e})")
                            nb = out_f * in_f * bits // 8 + param_bytes
                            layers = [layer] + [tp.make_gemlite_linear(qw.codes, qw.scales, qw.zeros, 8, bits, mode,
                                                                       gs) for _ in range(n_copies(nb, device) - 1)]
                            us = timer.us_per_call([lambda L=L: L(x16) for L in layers])
                            record((out_f, in_f), m, f"gemlite-W{bits}", bits, mode, us, nb + io_bytes, err)
                            del layers
                        except Exception as e:  # noqa: BLE001
                            record((out_f, in_f), m, f"gemlite-W{bits}", bits, mode, None, 0, None, f"FAILED: {e}")
                # ---- ours
                if "ours" not in args.skip:
                    for bits in args.bits:
                        a, b = cpu.slice_params(qw.scales, qw.zeros, 8, bits, mode)
                        a, b = a.contiguous(), b.contiguous()
                        for layout, codes in (("master", qw.codes),):
                            nbits = 8
                            nb = out_f * in_f * nbits // 8 + out_f * n_groups * 4 * 2  # fp32 A, B
                            key = tg.config_key(out_f, in_f, m, bits, mode, layout, gs)
                            try:
                                cfg = pick_config(tg, timer, tune, key, x16, codes, a, b, bits, mode, gs, device)
                                y = tg.matmul(x16, codes, a, b, 8, bits, mode, gs, config=cfg)
                                err = rel_err(y, refs[bits])
                                if err > 2e-2:
                                    raise RuntimeError(f"wrong result (rel err {err:.2e})")
                                copies = [(codes if i == 0 else codes.clone(), a.clone(), b.clone())
                                          for i in range(n_copies(nb, device))]
                                us = timer.us_per_call([lambda c=c: tg.matmul(x16, c[0], c[1], c[2], 8, bits, mode,
                                                                              gs, config=cfg) for c in copies])
                                record((out_f, in_f), m, f"ours-{layout}", bits, mode, us, nb + io_bytes, err,
                                       f"reads {nbits} bits/w; cfg {cfg}")
                                del copies
                            except Exception as e:  # noqa: BLE001
                                record((out_f, in_f), m, f"ours-{layout}", bits, mode, None, 0, None, f"FAILED: {e}")
    if args.tune_cache:
        _write_json(args.tune_cache, tune)
    if args.out:
        _write_json(args.out, dict(meta=meta, rows=rows))
    print_table(rows)
    return 0


def candidate_configs(tg, m: int, gs: int):
    """A small search space (8 configs): every (bits, mode, layout, config) is a separate compile."""
    bks = [bk for bk in (64, 128) if gs % bk == 0] or [64]
    out = []
    for bn in (16, 32) if m <= 4 else (32, 64):
        for bk in bks:
            for sk in (1, 4):
                if m <= 4:
                    out.append(tg.KernelConfig(triton_next_pow2(m), bn, bk, False, sk, 4))
                else:
                    out.append(tg.KernelConfig(16, bn, bk, True, sk, 4))
    return out


def triton_next_pow2(m: int) -> int:
    return 1 << max(0, (m - 1).bit_length())


def pick_config(tg, timer, tune, key, x, codes, a, b, bits, mode, gs, device):
    """Best config by a quick timing of each candidate (cached by key); the heuristic default on CPU."""
    if device != "cuda":
        return tg.default_config(x.shape[0], gs)
    if key in tune:
        return tg.KernelConfig(**tune[key])
    quick = Timer(device, calls=10, replays=5)
    best, best_us = None, float("inf")
    for cfg in candidate_configs(tg, x.shape[0], gs):
        try:
            us = quick.us_per_call([lambda: tg.matmul(x, codes, a, b, 8, bits, mode, gs, config=cfg)])
        except Exception:  # noqa: BLE001 - a config that does not compile/fit is skipped
            continue
        if us < best_us:
            best, best_us = cfg, us
    if best is None:
        raise RuntimeError("no Triton config ran")
    tune[key] = best.__dict__
    return best


def _write_json(path, obj):
    from matquant.format.atomic import atomic_write_json
    atomic_write_json(path, obj)


def print_table(rows):
    print("\n| shape [out×in] | batch | method | bits | mode | µs/call | % of copy bw | rel err | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        us = f"{r['us']:.1f}" if r["us"] else "-"
        roof = f"{r['roofline']:.0%}" if r["roofline"] is not None else "-"
        err = f"{r['rel_err']:.1e}" if r["rel_err"] is not None else "-"
        print(f"| {r['shape']} | {r['batch']} | {r['method']} | {r['bits']} | {r['mode'] or ''} | {us} | {roof} | "
              f"{err} | {r['note']} |")


if __name__ == "__main__":
    sys.exit(main())
