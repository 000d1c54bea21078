"""Low-bit CPU runtime (issue 27 part 1): the int2/int3 kernel against torch's int4 kernel, and SmolLM2 at every
precision, in one run.

``kernels``: per layer shape (576x1536, 1536x576, 4096x4096, 11008x4096; out x in, group 64, random codes) and
batch (1, 8), the time of one y = x·Wᵀ through torch's int4 kernel (`kernels.cpu_packed`, the int4 slice), the
int2 and int3 kernels (`kernels.lowbit`, best path of this CPU, and the AVX2 path), and a dense fp32/bf16
`F.linear` for context. The variants are interleaved repetition by repetition (A B C A B C ...) so a busy machine
slows them alike; per variant the median and the minimum wall time and the median process CPU time are kept.

``model``: SmolLM2-135M FFN+attn RTN checkpoint (`matquant quantize --model smollm2-135m --method rtn --scope
ffn+attn`) loaded with `matquant.load(ckpt, bits=r, keep_master=False)` for r in 2, 3, 4, 8, plus the fp32 model;
each in a fresh subprocess: resident weight bytes (`nn.memory.resident_bytes`, and those of the quantized layers),
prefill and decode tokens/s at batch 1 and 8 (a 64-token prompt, 16 new tokens, greedy, EOS ignored), wall and
per process CPU second (on a shared machine the wall time is mostly waiting for a core; CPU time is what the work
costs), eager and, with --compile, compiled (`nn.compiled.compile_decode`; the first, compiling run is the warm-up).

``switch``: a nested master held as packed planes (`matquant.load(ckpt, bits=8)`), the time to switch every layer
to int4 / int3 / int2 (set_bits + building each layer's slice, what the first forward after a switch does).

    python lab/benchmarks/bench_lowbit.py kernels --threads 1,2 --out lab/results/lowbit_kernels.json
    python lab/benchmarks/bench_lowbit.py model --ckpt WORK/rtn-ffnattn --threads 2 [--compile]
    python lab/benchmarks/bench_lowbit.py switch --ckpt WORK/rtn-ffnattn
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _paths import add_work_option, work_path

SHAPES = ((576, 1536), (1536, 576), (4096, 4096), (11008, 4096))
PROMPT, NEW = 64, 16
TEXT = ("Matryoshka quantization trains one integer model whose most significant bits are themselves good models. "
        "The int8 codes hold an int4 model in their top four bits and an int2 model in their top two bits. ")


def _timed(fn):
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def kernels(threads: int, reps: int, shapes=SHAPES) -> list[dict]:
    import torch
    import torch.nn.functional as F

    from matquant.kernels import cpu_packed, lowbit

    torch.set_num_threads(threads)
    assert lowbit.available(), "the low-bit kernel could not be built"
    best = int(torch.ops.matquant_lowbit.isa())
    rows = []
    for n, k in shapes:
        gen = torch.Generator().manual_seed(0)
        codes = torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=gen)
        scales = (torch.rand(n, k // 64, generator=gen) * 1e-3).half()
        zeros = torch.full((n, k // 64), 128.0).half()
        p4 = cpu_packed.pack_slice(codes, scales, zeros, 8, 4, "nested", 64)
        l2 = lowbit.pack_slice(codes, scales, zeros, 8, 2, "nested", 64)
        l3 = lowbit.pack_slice(codes, scales, zeros, 8, 3, "nested", 64)
        w32 = torch.randn(n, k) * 0.02
        w16 = w32.bfloat16()
        for m in (1, 8):
            x = torch.randn(m, k)
            xb = x.bfloat16()
            variants = {
                "int4 (torch int4pack)": lambda: cpu_packed.linear(x, p4),
                f"int2 ({lowbit.ISA_NAMES[best]})": lambda: lowbit.linear(x, l2),
                f"int3 ({lowbit.ISA_NAMES[best]})": lambda: lowbit.linear(x, l3),
                "fp32 F.linear": lambda: F.linear(x, w32),
                "bf16 F.linear": lambda: F.linear(xb, w16),
            }
            if best > 1:
                variants["int2 (AVX2)"] = lambda: lowbit.linear(x, l2, isa=1)
                variants["int3 (AVX2)"] = lambda: lowbit.linear(x, l3, isa=1)
            wall = {v: [] for v in variants}
            cpu = {v: [] for v in variants}
            for fn in variants.values():
                fn()
                fn()
            for _ in range(reps):
                for v, fn in variants.items():
                    w, c = _timed(fn)
                    wall[v].append(w)
                    cpu[v].append(c)
            for v in variants:
                rows.append({"shape": f"{n}x{k}", "batch": m, "threads": threads, "variant": v,
                             "median_ms": round(1e3 * statistics.median(wall[v]), 4),
                             "min_ms": round(1e3 * min(wall[v]), 4),
                             "cpu_median_ms": round(1e3 * statistics.median(cpu[v]), 4)})
                print(json.dumps(rows[-1]), flush=True)
    return rows


class _Times:
    """A generate() streamer that records when each step's tokens arrive, wall and process CPU (any batch size)."""

    def __init__(self):
        self.times, self.cpu = [], []

    def put(self, value):
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def end(self):
        pass


def model_worker(cfg: str, ckpt: str, threads: int, batches) -> list[dict]:
    import torch

    import matquant
    from matquant.commands.generate import _trim_heap
    from matquant.nn.memory import quantized_resident_bytes, resident_bytes

    torch.set_num_threads(threads)
    base, compiled, _ = cfg.partition("+compile")
    if base == "fp32":
        from matquant.models.loading import load_model

        model, tok, _ = load_model("smollm2-135m", dtype=torch.float32)
        model.eval()
        quant = 0
    else:
        model, tok = matquant.load(ckpt, bits=int(base.removeprefix("int")), keep_master=False)
        quant = quantized_resident_bytes(model)
    _trim_heap()
    weights = resident_bytes(model)
    packed = [(m, getattr(m.compute_backend, "packed", m.compute_backend)) for m in model.modules()
              if hasattr(m, "compute_backend") and m.backend in ("packed", "auto")]
    kinds = sorted({str(getattr(b.slices.get((m.bits, m.slicing if m.bits < m.master_bits else "paper")), "kind",
                                "?")) for m, b in packed})
    if compiled:
        from matquant.nn.compiled import compile_decode

        compile_decode(model)
    ids1 = tok(TEXT * 4, return_tensors="pt")["input_ids"][:, :PROMPT]
    model.generation_config.eos_token_id = None
    out = []
    for b in batches:
        ids = ids1.repeat(b, 1)
        kw = dict(attention_mask=torch.ones_like(ids), max_new_tokens=NEW, do_sample=False, temperature=None,
                  top_p=None, top_k=None, pad_token_id=0)
        with torch.inference_mode():
            t0 = time.perf_counter()
            if compiled:  # warm-up: the same shapes (compiles)
                model.generate(ids, **kw)
            else:
                model.generate(ids[:, :8], **dict(kw, attention_mask=torch.ones_like(ids[:, :8]), max_new_tokens=2))
            warm = time.perf_counter() - t0
            st = _Times()
            c0 = time.process_time()
            t0 = time.perf_counter()
            model.generate(ids, streamer=st, **kw)
        prefill_s = st.times[1] - t0  # times[0]: the prompt is put before any forward
        decode_s = st.times[-1] - st.times[1]
        prefill_cpu, decode_cpu = st.cpu[1] - c0, st.cpu[-1] - st.cpu[1]
        out.append({"config": cfg, "batch": b, "threads": threads, "resident_weight_mib": round(weights / 2**20, 2),
                    "quantized_layers_mib": round(quant / 2**20, 2), "slice_kinds": kinds,
                    "prefill_tok_s": round(b * PROMPT / prefill_s, 1),
                    "decode_tok_s": round(b * (NEW - 1) / decode_s, 2),
                    "prefill_tok_per_cpu_s": round(b * PROMPT / prefill_cpu, 1),
                    "decode_tok_per_cpu_s": round(b * (NEW - 1) / decode_cpu, 2),
                    "warmup_s": round(warm, 1)})
    return out


def switch(ckpt: str, threads: int, reps: int) -> list[dict]:
    import torch

    import matquant
    from matquant.nn.memory import matquant_modules

    torch.set_num_threads(threads)
    model, _ = matquant.load(ckpt, bits=8)
    layers = list(matquant_modules(model).values())
    rows = []
    for a, b in ((8, 4), (4, 2), (2, 3), (3, 4), (4, 3), (3, 2), (2, 8)):
        wall, cpu = [], []
        for _ in range(reps):
            matquant.set_bits(model, a)
            for m in layers:
                m.compute_backend.packed_slice(m)

            def go():
                matquant.set_bits(model, b)
                for m in layers:
                    m.compute_backend.packed_slice(m)

            w, c = _timed(go)
            wall.append(w)
            cpu.append(c)
        rows.append({"switch": f"{a}->{b}", "layers": len(layers), "threads": threads,
                     "median_ms": round(1e3 * statistics.median(wall), 1), "min_ms": round(1e3 * min(wall), 1),
                     "cpu_median_ms": round(1e3 * statistics.median(cpu), 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("kernels", "model", "switch"))
    ap.add_argument("--threads", default="2", help="comma-separated thread counts (kernels); one for model/switch")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--ckpt", default=None, help="SmolLM2 FFN+attn RTN checkpoint (default WORK/rtn-ffnattn)")
    ap.add_argument("--configs", default="int2,int4,int3,int8,fp32")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--compile", action="store_true", help="also every config compiled (minutes each)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    add_work_option(ap)
    args = ap.parse_args(argv)
    ckpt = args.ckpt or str(work_path("rtn-ffnattn", work=args.work))
    batches = [int(b) for b in args.batches.split(",")]
    if args.worker:
        print("RESULT " + json.dumps(model_worker(args.worker, ckpt, int(args.threads), batches)), flush=True)
        return
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "load_avg_start": os.getloadavg()}
    if args.what == "kernels":
        rows = [r for t in args.threads.split(",") for r in kernels(int(t), args.reps)]
    elif args.what == "switch":
        rows = switch(ckpt, int(args.threads), args.reps)
    else:
        rows = []
        cfgs = args.configs.split(",")
        cfgs += [c + "+compile" for c in cfgs] if args.compile else []
        for cfg in cfgs:
            cmd = [sys.executable, __file__, "model", "--worker", cfg, "--ckpt", ckpt, "--threads", args.threads,
                   "--batches", args.batches]
            p = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
            got = json.loads(line[7:]) if line else [{"config": cfg, "error": p.stderr[-800:]}]
            for r in got:
                print(json.dumps(r), flush=True)
            rows += got
    meta["load_avg_end"] = os.getloadavg()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
