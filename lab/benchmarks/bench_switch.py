"""Precision switch time of the packed CPU runtime (issue 15: target <= 50 ms for SmolLM2), before/after the
master held as packed planes, in one run.

Three ways to hold the same RTN int8 master of a SmolLM2 checkpoint, each loaded with `matquant.load(ckpt, bits=8)`:

- ``paper-repack``   the checkpoint's own paper slicing: every switch re-packs the slice from the uint8 codes
                     (the code path before this change, untouched by it);
- ``nested-repack``  nested slicing, uint8 master (``prepare_packed(planes=False)``): re-packed from the codes,
                     the previous code path for nested;
- ``nested-planes``  nested slicing, the master held as two packed planes (what `matquant.load` now does):
                     a switch is at most one AND per layer.

Per precision pair a -> b, median of `--reps`: ``switch_ms`` = `set_bits(model, b)` + building every layer's new
slice (exactly the work the first forward after a switch does, `PackedBackend.packed_slice`), timed alone (wall, and
``switch_cpu_ms`` the process CPU time of the same interval: on a shared, overloaded machine the wall time is
mostly waiting for a core, the CPU time is what the switch costs; all threads summed); and
``e2e_ms`` = set_bits + the first 1-token forward minus a steady 1-token forward (noisier). Also one quick decode
row per variant (int4 and int6 tokens/s, 16 new tokens after a 32-token prompt) to show the runtime did not get slower.

    python lab/benchmarks/bench_switch.py --threads 1 --out lab/results/switch_t1.json

--ckpts defaults to WORK/rtn-ffn,WORK/rtn-ffnattn (the checkpoints of bench_cpu_runtime.py); WORK is the work
folder (--work, else $MATQUANT_WORK, else ./matquant-work; lab/benchmarks/_paths.py).
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

PAIRS = ((8, 4), (4, 2), (2, 8), (8, 6), (6, 3), (3, 5), (5, 7), (7, 4), (4, 8))
VARIANTS = ("paper-repack", "nested-repack", "nested-planes")


def _load(ckpt: str, variant: str):
    import matquant
    from matquant.nn.memory import prepare_packed

    if variant == "nested-repack":  # the uint8 master of before: packed backend, prepared without planes
        m, tok = matquant.load(ckpt, bits=8, slicing="nested", backend="torch")
        matquant.set_backend(m, "packed")
        prepare_packed(m, planes=False)
    else:
        m, tok = matquant.load(ckpt, bits=8, slicing="nested" if variant == "nested-planes" else None)
    return m.eval(), tok


def _pack_all(model):
    from matquant.nn.bits import matquant_modules

    for lay in matquant_modules(model).values():
        lay.compute_backend.packed_slice(lay)


def switch_rows(ckpt: str, variant: str, reps: int) -> list[dict]:
    import torch

    import matquant
    from matquant.nn.memory import quantized_resident_bytes, resident_bytes

    m, _ = _load(ckpt, variant)
    layers = matquant.nn.matquant_modules(m)
    held = sum(lay.master_planes is not None for lay in layers.values())
    ids = torch.tensor([[1, 2, 3, 4]])
    rows = []
    with torch.inference_mode():
        m(ids)
        for a, b in PAIRS:
            sw, cpu, e2e, steady = [], [], [], []
            for _ in range(reps):
                matquant.set_bits(m, a)
                _pack_all(m)
                m(ids)
                t0, c0 = time.perf_counter(), time.process_time()
                matquant.set_bits(m, b)
                _pack_all(m)
                sw.append(time.perf_counter() - t0)
                cpu.append(time.process_time() - c0)
                matquant.set_bits(m, a)
                _pack_all(m)
                t0 = time.perf_counter()
                m(ids)
                steady.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                matquant.set_bits(m, b)
                m(ids)
                e2e.append(time.perf_counter() - t0)
            rows.append({"variant": variant, "switch": f"{a}->{b}",
                         "switch_ms": round(1e3 * statistics.median(sw), 2),
                         "switch_ms_min": round(1e3 * min(sw), 2),
                         "switch_cpu_ms": round(1e3 * statistics.median(cpu), 2),
                         "e2e_ms": round(1e3 * (statistics.median(e2e) - statistics.median(steady)), 1),
                         "forward_ms": round(1e3 * statistics.median(steady), 1),
                         "resident_mib_at_target": round(resident_bytes(m) / 2**20, 2),
                         "quantized_mib_at_target": round(quantized_resident_bytes(m) / 2**20, 2),
                         "layers": len(layers), "layers_with_planes": held,
                         "load_avg": round(os.getloadavg()[0], 2)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def decode_rows(ckpt: str, variant: str, new_tokens: int) -> list[dict]:
    import matquant
    from matquant.commands.generate import generate

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_cpu_runtime import prompt_ids

    m, tok = _load(ckpt, variant)
    ids, mask = prompt_ids(tok)
    m.generation_config.eos_token_id = None
    rows = []
    for b in (4, 6):
        matquant.set_bits(m, b)
        generate(m, tok, ids[:, :16], mask[:, :16], max_new_tokens=4, stream=False)  # warm-up (packs)
        r = generate(m, tok, ids[:, :32], mask[:, :32], max_new_tokens=new_tokens, stream=False)
        rows.append({"variant": variant, "bits": b, "decode_tok_s": round(r["decode_tok_s"], 2),
                     "prefill_tok_s": round(r["prefill_tok_s"], 2), "load_avg": round(os.getloadavg()[0], 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def worker(ckpt: str, variant: str, threads: int, reps: int, decode_tokens: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    out = {"switch": switch_rows(ckpt, variant, reps)}
    if decode_tokens:
        out["decode"] = decode_rows(ckpt, variant, decode_tokens)
    return out


def table(result: dict) -> str:
    """Markdown: per checkpoint and thread count, one row per pair, wall / CPU ms of every variant."""
    runs = [r for r in result["runs"] if "switch" in r]
    variants = [v for v in VARIANTS if any(r["variant"] == v for r in runs)]
    out = []
    for ckpt, threads in dict.fromkeys((r["ckpt"], r["threads"]) for r in runs):
        by = {r["variant"]: {row["switch"]: row for row in r["switch"]} for r in runs
              if (r["ckpt"], r["threads"]) == (ckpt, threads)}
        layers = next(iter(by.values()))[next(iter(next(iter(by.values()))))]["layers"]
        out += [f"**{ckpt}, {threads} thread(s), {layers} layers** (switch wall / CPU ms, median)", "",
                "| switch | " + " | ".join(variants) + " |", "|---|" + "---|" * len(variants)]
        for a, b in PAIRS:
            key = f"{a}->{b}"
            cells = [f"{by[v][key]['switch_ms']:.0f} / {by[v][key]['switch_cpu_ms']:.0f}" if key in by.get(v, {})
                     else "" for v in variants]
            out.append(f"| {a} → {b} | " + " | ".join(cells) + " |")
        dec = {r["variant"]: {d["bits"]: d["decode_tok_s"] for d in r.get("decode", [])} for r in runs
               if (r["ckpt"], r["threads"]) == (ckpt, threads)}
        if any(dec.values()):
            out.append("| decode tok/s int4 / int6 | " + " | ".join(
                f"{dec[v].get(4, '')} / {dec[v].get(6, '')}" for v in variants) + " |")
        out.append("")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_work_option(p, "the default checkpoints")
    p.add_argument("--ckpts", default=None, help="comma-separated checkpoints (default: WORK/rtn-ffn,WORK/rtn-ffnattn)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--decode-tokens", type=int, default=16, help="0: skip the decode rows")
    p.add_argument("--worker", nargs=3, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    p.add_argument("--table", default=None, metavar="JSON", help="print the markdown table of a result file")
    a = p.parse_args(argv)
    a.ckpts = a.ckpts or ",".join(str(work_path(n, work=a.work)) for n in ("rtn-ffn", "rtn-ffnattn"))
    if a.table:
        print(table(json.loads(Path(a.table).read_text())))
        return 0
    if a.worker:
        ckpt, variant, threads = a.worker
        print("RESULT " + json.dumps(worker(ckpt, variant, int(threads), a.reps, a.decode_tokens)))
        return 0
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_cpu_runtime import machine

    result = {"machine": machine(), "uptime_start": subprocess.run(["uptime"], capture_output=True,
                                                                   text=True).stdout.strip(), "runs": []}
    for threads in a.threads.split(","):
        for ckpt in a.ckpts.split(","):
            for variant in a.variants.split(","):  # each in a fresh process: its own memory and threads
                proc = subprocess.run([sys.executable, __file__, "--worker", ckpt, variant, threads, "--reps",
                                       str(a.reps), "--decode-tokens", str(a.decode_tokens)],
                                      capture_output=True, text=True)
                line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                run = {"ckpt": Path(ckpt).name, "variant": variant, "threads": int(threads),
                       "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
                run.update(json.loads(line[7:]) if line else {"error": proc.stderr[-1500:]})
                print(json.dumps({k: v for k, v in run.items() if k not in ("switch", "decode")}), flush=True)
                for row in run.get("switch", []):
                    print(f"  {run['ckpt']} t{threads} {variant:14s} {row['switch']}: switch {row['switch_ms']} ms"
                          f" (cpu {row['switch_cpu_ms']} ms)"
                          f" (e2e {row['e2e_ms']} ms, forward {row['forward_ms']} ms)", flush=True)
                for row in run.get("decode", []):
                    print(f"  decode int{row['bits']}: {row['decode_tok_s']} tok/s", flush=True)
                result["runs"].append(run)
                if a.out:  # after every run: a killed benchmark keeps what it measured
                    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
                    Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    result["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(table(result))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
