"""Int8 token embedding and output head (issue 27, part 2): what they save and what they cost, fp32 vs int8 side by
side in one process.

    python lab/benchmarks/bench_embed.py speed --ckpt WORK/smol-rtn --bits 4          # resident bytes, tok/s
    python lab/benchmarks/bench_embed.py ppl --model smollm2-135m                      # perplexity, full model
    python lab/benchmarks/bench_embed.py ppl --ckpt WORK/smol-rtn --bits 4             # perplexity, a slice
    python lab/benchmarks/bench_embed.py resident --ckpt WORK/gemma-rtn --bits 4       # resident bytes only
    python lab/benchmarks/bench_embed.py kernel --vocab 49152 --hidden 576             # the head's matmul paths

`speed` loads the slice twice (keep_master=False; fp32 and int8 embeddings/head), then alternates greedy generations
of the same prompt (PROMPT_TOKENS prompt tokens, --new-tokens new ones, EOS ignored) between the two, --reps times,
and reports the median prefill / decode tokens/s and CPU seconds of each, with the resident tensor bytes per part
(`matquant.nn.memory.resident_bytes_by_part`). `ppl` measures perplexity on the 6 x 2048 eval windows with the
checkpoint's float embeddings, then quantizes them in place (`nn.quantized_embedding.quantize_embeddings`, what
`load(quantize_embeddings=True)` does) and measures again. Every subcommand appends one JSON line to --out
(default WORK/embed/results.jsonl; WORK: --work, else $MATQUANT_WORK, else ./matquant-work).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

from _paths import add_work_option, work_path

PROMPT_TOKENS = 128
TEXT = ("Matryoshka quantization trains one integer model whose most significant bits are themselves good models. "
        "The int8 codes hold an int4 model in their top four bits and an int2 model in their top two bits, so a "
        "single checkpoint serves every precision. ")


def _machine() -> dict:
    import torch

    return {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "loadavg": os.getloadavg(), "torch": torch.__version__}


def _parts_mib(model) -> dict:
    from matquant.nn.memory import resident_bytes_by_part

    return {k: round(v / 2**20, 2) for k, v in resident_bytes_by_part(model).items()}


def _load(args, int8: bool):
    import matquant

    return matquant.load(args.ckpt, bits=args.bits, keep_master=False, quantize_embeddings=int8)


def cmd_speed(args) -> dict:
    import torch

    from matquant.commands.generate import TimingStreamer

    models = {name: _load(args, name == "int8") for name in ("fp32", "int8")}
    tok = models["fp32"][1]
    ids = tok(TEXT * 8, return_tensors="pt")["input_ids"][:, :PROMPT_TOKENS]
    runs: dict[str, list[dict]] = {k: [] for k in models}
    texts = {}
    for rep in range(args.reps + 1):  # the first round warms up (not counted)
        for name, (model, _) in models.items():
            streamer = TimingStreamer()
            t0, c0 = time.perf_counter(), time.process_time()
            with torch.inference_mode():
                out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                     max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                     streamer=streamer, pad_token_id=tok.eos_token_id,
                                     temperature=None, top_p=None, top_k=None)
            cpu = time.process_time() - c0
            prefill = streamer.times[0] - t0
            decode = streamer.times[-1] - streamer.times[0]
            texts[name] = tok.decode(out[0, ids.shape[1]:][:24])
            if rep:
                runs[name].append({"prefill_tok_s": ids.shape[1] / prefill,
                                   "decode_tok_s": (args.new_tokens - 1) / decode, "cpu_s": cpu})
    result = {"what": "speed", "ckpt": str(args.ckpt), "bits": args.bits, "prompt_tokens": int(ids.shape[1]),
              "new_tokens": args.new_tokens, "reps": args.reps, "machine": _machine()}
    for name, (model, _) in models.items():
        med = {k: round(statistics.median(r[k] for r in runs[name]), 2) for k in runs[name][0]}
        result[name] = {"resident_mib": _parts_mib(model), **med,
                        "decode_tok_s_all": [round(r["decode_tok_s"], 2) for r in runs[name]],
                        "first_tokens": texts[name]}
    return result


def _windows(tok, n: int, seqlen: int):
    from matquant.data.text import token_windows

    return token_windows(tok, "eval", seqlen, n)


def cmd_ppl(args) -> dict:
    from matquant.eval.perplexity import perplexity
    from matquant.nn.quantized_embedding import quantize_embeddings

    if args.model:
        from matquant.models.loading import load_model

        model, tok, _ = load_model(args.model)
        model.eval()
        what = f"{args.model} (full precision)"
    else:
        model, tok = _load(args, False)
        what = f"{args.ckpt} int{args.bits}"
    w = _windows(tok, args.windows, args.seqlen)
    res = {"what": "ppl", "model": what, "windows": int(w.shape[0]), "seqlen": int(w.shape[1]),
           "machine": _machine()}
    for name in ("fp32", "int8"):
        if name == "int8":
            res["quantized"] = quantize_embeddings(model)
        t0 = time.perf_counter()
        r = perplexity(model, w, progress=False)
        res[name] = {"ppl": round(r.ppl, 4), "nll": r.nll, "eval_s": round(time.perf_counter() - t0, 1),
                     "resident_mib": _parts_mib(model)}
    res["ppl_cost_pct"] = round(100 * (res["int8"]["ppl"] / res["fp32"]["ppl"] - 1), 3)
    return res


def cmd_resident(args) -> dict:
    import gc

    from matquant.nn.memory import release_freed_memory

    res = {"what": "resident", "ckpt": str(args.ckpt), "bits": args.bits, "machine": _machine()}
    for name in ("fp32", "int8"):
        model, _ = _load(args, name == "int8")
        res[name] = {"resident_mib": _parts_mib(model)}
        del model
        gc.collect()
        release_freed_memory()
    return res


def cmd_kernel(args) -> dict:
    """The head's candidate matmuls at one vocabulary shape, per activation row count, interleaved repetitions."""
    import torch
    import torch.nn.functional as F

    from matquant.nn.quantized_embedding import Int8Head, Int8Table

    torch.manual_seed(0)
    w = torch.randn(args.vocab, args.hidden) * 0.05
    table = Int8Table.from_weight(w)
    head = Int8Head(table, torch.float32)
    res = {"what": "kernel", "vocab": args.vocab, "hidden": args.hidden, "machine": _machine(), "ms": {}, "cpu_ms": {}}
    for m in args.rows:
        x = torch.randn(m, args.hidden)
        xb = x.to(torch.bfloat16)
        cands = {"fp32 F.linear": lambda: F.linear(x, w),
                 "int8pack bf16": lambda: torch._weight_int8pack_mm(xb, table.codes, table.scales),
                 "Int8Head": lambda: head(x)}
        times = {k: [] for k in cands}
        cpu = {k: [] for k in cands}
        for _ in range(args.reps):
            for k, f in cands.items():
                t0, c0 = time.perf_counter(), time.process_time()
                f()
                times[k].append(time.perf_counter() - t0)
                cpu[k].append(time.process_time() - c0)
        res["ms"][m] = {k: round(1e3 * statistics.median(v[1:]), 3) for k, v in times.items()}
        res["cpu_ms"][m] = {k: round(1e3 * statistics.median(v[1:]), 3) for k, v in cpu.items()}
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("cmd", choices=("speed", "ppl", "resident", "kernel"))
    p.add_argument("--ckpt", default=None)
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--model", default=None, help="ppl of a full-precision model (instead of --ckpt)")
    p.add_argument("--windows", type=int, default=6)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 64, 512])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None)
    add_work_option(p)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if args.cmd in ("speed", "resident") or (args.cmd == "ppl" and not args.model):
        if not args.ckpt:
            p.error(f"{args.cmd} needs --ckpt (a matquant checkpoint folder)")
    res = {"speed": cmd_speed, "ppl": cmd_ppl, "resident": cmd_resident, "kernel": cmd_kernel}[args.cmd](args)
    out = args.out or work_path("embed", "results.jsonl", work=args.work)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(res) + "\n")
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
