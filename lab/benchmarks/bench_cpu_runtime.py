"""CPU runtime benchmark (issue 15): decode / prefill tokens/s and memory of SmolLM2-135M at every precision,
matquant's packed runtime against the fp32 / bf16 model and llama.cpp.

One run, batch 1, the same 128-token prompt and 128 new tokens (EOS ignored), greedy. Every configuration runs in
a fresh subprocess (so its RSS is its own): RSS after load and after generation (psutil), plus the bytes of the
tensors the model holds (`matquant.nn.memory.resident_bytes`: weights, packed slices, caches; no allocator slack).
llama.cpp: `llama-bench -p 128 -n 128` for the speeds and `/usr/bin/time -v` for its peak RSS.

    python lab/benchmarks/bench_cpu_runtime.py --ckpt-ffn DIR --ckpt-ffnattn DIR --gguf-dir DIR \
        --threads 2 --out lab/results/cpu_runtime_t2.json
    python lab/benchmarks/bench_cpu_runtime.py --switch --ckpt-ffnattn DIR      # precision switch times
    python lab/benchmarks/bench_cpu_runtime.py --profile --ckpt-ffnattn DIR     # where int4 decode time goes

Default folders are in the work folder WORK (--work, else $MATQUANT_WORK, else ./matquant-work): WORK/rtn-ffn,
WORK/rtn-ffnattn, WORK/gguf. llama-bench comes from $MATQUANT_LLAMA_CPP, else PATH (lab/benchmarks/_paths.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from _paths import add_work_option, llama_tool, work_path

PROMPT_TOKENS = 128
NEW_TOKENS = 128
GGUF_TYPES = ("F16", "Q8_0", "Q4_1", "Q4_K_M", "Q2_K")
TEXT = ("Matryoshka quantization trains one integer model whose most significant bits are themselves good models. "
        "The int8 codes hold an int4 model in their top four bits and an int2 model in their top two bits, so a "
        "single checkpoint serves every precision. ")


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def load_config(cfg: str, ckpts: dict):
    """'fp32' | 'bf16' | 'SCOPE:BITS[:FORMAT][@bf16]' (SCOPE ffn or ffnattn, FORMAT int4x2 or bf16; '@bf16': the
    unquantized parts (embeddings, LM head, norms) and activations in bf16). The worker also takes a '+compile'
    suffix on any of them (matquant.nn.compiled.compile_decode; its first, compiling run is the warm-up)."""
    import torch

    cfg, _, model_dtype = cfg.partition("@")

    if cfg in ("fp32", "bf16"):
        from matquant.models.loading import load_model

        m, tok, _ = load_model("smollm2-135m", dtype=torch.float32 if cfg == "fp32" else torch.bfloat16)
        return m.eval(), tok
    import matquant

    scope, bits, *fmt = cfg.split(":")
    m, tok = matquant.load(ckpts[scope], bits=int(bits), keep_master=False,
                           high_format=fmt[0] if fmt else None,
                           dtype=torch.bfloat16 if model_dtype == "bf16" else torch.float32)
    return m.eval(), tok


def prompt_ids(tok):
    import torch

    ids = tok(TEXT * 8, return_tensors="pt")["input_ids"][:, :PROMPT_TOKENS]
    assert ids.shape[1] == PROMPT_TOKENS
    return ids, torch.ones_like(ids)


def worker(cfg: str, ckpts: dict, threads: int) -> dict:
    import torch

    from matquant.commands.generate import _trim_heap, generate
    from matquant.nn.memory import resident_bytes

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    base, compiled, _ = cfg.partition("+compile")  # compiled: "+compile" or ""
    model, tok = load_config(base, ckpts)
    load_s = time.perf_counter() - t0
    _trim_heap()
    rss_load = _rss_mib()
    weights = resident_bytes(model)
    ids, mask = prompt_ids(tok)
    model.generation_config.eos_token_id = None  # exactly NEW_TOKENS new tokens
    compile_s = None
    if compiled:  # the warm-up is the same run (same shapes): it compiles
        from matquant.nn.compiled import compile_decode

        compile_decode(model)
        t1 = time.perf_counter()
        generate(model, tok, ids, mask, max_new_tokens=NEW_TOKENS, stream=False)
        compile_s = round(time.perf_counter() - t1, 1)
    else:
        generate(model, tok, ids[:, :16], mask[:, :16], max_new_tokens=4, stream=False)  # warm-up
    r = generate(model, tok, ids, mask, max_new_tokens=NEW_TOKENS, stream=False)
    return {"config": cfg, "threads": threads, "load_s": round(load_s, 2), "rss_load_mib": round(rss_load, 1),
            "rss_gen_mib": round(_rss_mib(), 1), "resident_weight_mib": round(weights / 2**20, 2),
            "prefill_tok_s": round(r["prefill_tok_s"], 2), "decode_tok_s": round(r["decode_tok_s"], 2),
            "new_tokens": r["new_tokens"], "text_head": r["text"][:60], "compile_first_run_s": compile_s}


def llama_cpp(gguf_dir: Path, typ: str, threads: int) -> dict:
    cmd = ["/usr/bin/time", "-v", str(llama_tool("llama-bench")), "-m", str(gguf_dir / f"{typ}.gguf"),
           "-p", str(PROMPT_TOKENS), "-n", str(NEW_TOKENS), "-t", str(threads), "-r", "3", "-o", "json"]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode:
        return {"config": f"llama.cpp {typ}", "error": p.stderr[-500:]}
    rows = json.loads(p.stdout)
    rss = next((int(line.split()[-1]) / 1024 for line in p.stderr.splitlines() if "Maximum resident" in line), None)
    out = {"config": f"llama.cpp {typ}", "threads": threads, "peak_rss_mib": round(rss, 1) if rss else None,
           "model_size_mib": round(rows[0]["model_size"] / 2**20, 2), "build": rows[0]["build_commit"]}
    for row in rows:
        key = "prefill_tok_s" if row["n_prompt"] else "decode_tok_s"
        out[key] = round(row["avg_ts"], 2)
        out[key.replace("tok_s", "samples")] = [round(s, 2) for s in row["samples_ts"]]
    return out


def switch_times(ckpt: str, threads: int) -> list[dict]:
    """set_bits + the first 1-token forward, minus a steady 1-token forward (median of 5)."""
    import statistics

    import torch

    import matquant

    torch.set_num_threads(threads)
    ids = torch.tensor([[1, 2, 3, 4]])
    rows = []
    for keep in (None, [8, 4, 2]):
        m, _ = matquant.load(ckpt, bits=8, keep=keep)
        with torch.no_grad():
            if keep:  # pack the kept precisions once
                for b in keep:
                    matquant.set_bits(m, b)
                    m(ids)
            for a, b in ((8, 4), (4, 2), (2, 8)):
                sw, steady = [], []
                for _ in range(5):
                    matquant.set_bits(m, a)
                    m(ids)
                    t0 = time.perf_counter()
                    m(ids)
                    steady.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    matquant.set_bits(m, b)
                    m(ids)
                    sw.append(time.perf_counter() - t0)
                rows.append({"keep": keep, "switch": f"{a}->{b}",
                             "switch_plus_forward_ms": round(1e3 * statistics.median(sw), 1),
                             "forward_ms": round(1e3 * statistics.median(steady), 1),
                             "switch_ms": round(1e3 * (statistics.median(sw) - statistics.median(steady)), 1)})
    return rows


def profile(ckpt: str, threads: int, bits: int = 4, steps: int = 32, compile_too: bool = False) -> dict:
    """torch.profiler over `steps` decode steps: self CPU time by op, and torch.compile tried on the model."""
    import torch
    from torch.profiler import ProfilerActivity, profile as tprofile

    import matquant

    torch.set_num_threads(threads)
    m, tok = matquant.load(ckpt, bits=bits, keep_master=False)
    ids, mask = prompt_ids(tok)
    m.generation_config.eos_token_id = None
    kw = dict(max_new_tokens=steps, do_sample=False, temperature=None, top_p=None, top_k=None, pad_token_id=0)
    with torch.inference_mode():
        m.generate(ids[:, :16], max_new_tokens=4, do_sample=False, temperature=None, top_p=None, top_k=None,
                   pad_token_id=0)
        t0 = time.perf_counter()
        m.generate(ids[:, :8], **kw)
        wall = time.perf_counter() - t0
        with tprofile(activities=[ProfilerActivity.CPU]) as prof:
            m.generate(ids[:, :8], **kw)
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    ops = sorted(((e.key, e.self_cpu_time_total) for e in prof.key_averages()), key=lambda x: -x[1])[:12]
    out = {"bits": bits, "threads": threads, "steps": steps, "wall_ms_per_token": round(1e3 * wall / steps, 2),
           "profiled_self_cpu_ms_per_token": round(total / 1e3 / steps, 2),
           "top_ops_ms_per_token": [(k, round(v / 1e3 / steps, 3)) for k, v in ops]}
    print(json.dumps(out, indent=1), flush=True)
    if not compile_too:
        return out
    try:  # torch.compile of the decode step (the int4 op is an aten op: dynamo can trace it)
        m.forward = torch.compile(m.forward, dynamic=True)
        with torch.inference_mode():
            t0 = time.perf_counter()
            m.generate(ids[:, :8], **kw)  # includes compilation
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            m.generate(ids[:, :8], **kw)
            out["compiled_wall_ms_per_token"] = round(1e3 * (time.perf_counter() - t0) / steps, 2)
            out["compile_first_call_s"] = round(first, 1)
    except Exception as e:  # recorded, not hidden
        out["compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return out


def machine() -> dict:
    import torch
    import transformers

    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "platform": platform.platform(),
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "torch": torch.__version__,
            "transformers": transformers.__version__, "load_avg": os.getloadavg()}


def table(rows: list[dict]) -> str:
    fp32 = next((r for r in rows if r["config"] == "fp32"), None)
    lines = ["| config | prefill tok/s | decode tok/s | decode vs fp32 | resident weights MiB | RSS after load MiB | "
             "RSS after gen MiB |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['config']} | error | | | | | |")
            continue
        ratio = f"{r['decode_tok_s'] / fp32['decode_tok_s']:.2f}x" if fp32 and r.get("decode_tok_s") else ""
        weights = r.get("resident_weight_mib", r.get("model_size_mib", ""))
        lines.append(f"| {r['config']} | {r.get('prefill_tok_s', '')} | {r.get('decode_tok_s', '')} | {ratio} | "
                     f"{weights} | {r.get('rss_load_mib', '')} | {r.get('rss_gen_mib', r.get('peak_rss_mib', ''))} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_work_option(p, "the default checkpoint and GGUF folders")
    p.add_argument("--ckpt-ffn", default=None, help="RTN FFN-only checkpoint (default: WORK/rtn-ffn)")
    p.add_argument("--ckpt-ffnattn", default=None, help="RTN FFN+attention checkpoint (default: WORK/rtn-ffnattn)")
    p.add_argument("--gguf-dir", default=None, type=Path, help="GGUF files for llama-bench (default: WORK/gguf)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--configs", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--bits", default="8,6,4,3,2")
    p.add_argument("--no-llama", action="store_true")
    p.add_argument("--gguf-types", default=",".join(GGUF_TYPES),
                   help="GGUF files (NAME.gguf in --gguf-dir) llama-bench runs, e.g. llama.cpp's own F16,Q4_1 and "
                        "matquant exports copied there as mq_int4.gguf (default %(default)s)")
    p.add_argument("--switch", action="store_true", help="measure precision switch times instead")
    p.add_argument("--profile", action="store_true", help="profile int4 decode (+ torch.compile) instead")
    p.add_argument("--compile", action="store_true", help="with --profile: also try torch.compile (slow)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    a.ckpt_ffn = a.ckpt_ffn or str(work_path("rtn-ffn", work=a.work))
    a.ckpt_ffnattn = a.ckpt_ffnattn or str(work_path("rtn-ffnattn", work=a.work))
    a.gguf_dir = a.gguf_dir or work_path("gguf", work=a.work)
    ckpts = {"ffn": a.ckpt_ffn, "ffnattn": a.ckpt_ffnattn}
    if a.worker:
        print("RESULT " + json.dumps(worker(a.worker, ckpts, a.threads)))
        return 0
    result = {"machine": machine(), "prompt_tokens": PROMPT_TOKENS, "new_tokens": NEW_TOKENS}
    if a.switch:
        result["switch"] = switch_times(a.ckpt_ffnattn, a.threads)
        print(json.dumps(result["switch"], indent=1))
    elif a.profile:
        result["profile"] = profile(a.ckpt_ffnattn, a.threads, compile_too=a.compile)
        print(json.dumps(result["profile"], indent=1))
    else:
        if not a.no_llama:
            llama_tool("llama-bench")  # fail now, not after the matquant rows
        bits = [int(b) for b in a.bits.split(",")]
        configs = a.configs.split(",") if a.configs else (
            ["fp32", "bf16"] + [f"{s}:{b}" for s in ("ffn", "ffnattn") for b in bits] + ["ffnattn:8:bf16"])
        rows = []
        for cfg in configs:
            proc = subprocess.run([sys.executable, __file__, "--worker", cfg, "--threads", str(a.threads),
                                   "--ckpt-ffn", a.ckpt_ffn, "--ckpt-ffnattn", a.ckpt_ffnattn],
                                  capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            row = json.loads(line[7:]) if line else {"config": cfg, "error": proc.stderr[-800:]}
            row["load_avg_after"] = round(os.getloadavg()[0], 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
        if not a.no_llama:
            for typ in a.gguf_types.split(","):
                row = llama_cpp(a.gguf_dir, typ, a.threads)
                row["load_avg_after"] = round(os.getloadavg()[0], 2)
                print(json.dumps(row), flush=True)
                rows.append(row)
        result["rows"] = rows
        result["machine"]["load_avg_end"] = os.getloadavg()
        print(table(rows))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
