"""Gemma-3-270M end to end through the CLI (issue 26): every method, every export, the runtime and the slice
perplexities, each step a separate process whose wall time, peak RSS and output size are recorded.

    python lab/benchmarks/gemma3_cli.py run                       # every step, in order; resumable
    python lab/benchmarks/gemma3_cli.py run --steps rtn,eval-rtn  # some steps
    python lab/benchmarks/gemma3_cli.py list                      # the steps and their commands
    python lab/benchmarks/gemma3_cli.py table                     # markdown tables from the results file

Each step is one command (`matquant quantize --model gemma3-270m ...`, `matquant eval`, `matquant export`,
`matquant generate`, or one of this script's own in-process helpers: `fp32` = the source model's perplexity on the
same windows as `matquant eval`; with `--model FILE.gguf` the same for an exported GGUF read back by transformers'
GGUF loader, `load` = `matquant.load(ckpt, bits=4)` + a greedy generation; `llama-ppl` = llama.cpp's own
`llama-perplexity` on the source GGUF and the exported ones, where its binary is found: $LLAMA_CPP_BIN). A step's row (JSON
line in WORK/gemma3/results.jsonl) has its command, exit status, wall seconds, peak RSS of the process (wait4's
ru_maxrss), the size of what it wrote, and the tail of its output; `run` skips steps with a successful row (pass
--again to redo them) and steps another runner is running (a claim file per step), so two runners can share a
list side by side (mind the memory: a perplexity pass holds [seqlen, 262144] fp32 logits and copies of them).
Perplexity rows come from `matquant eval --json`. WORK is the work folder (--work, else $MATQUANT_WORK, else
./matquant-work; lab/benchmarks/_paths.py).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _paths import add_work_option, work_path  # noqa: E402

MODEL = "gemma3-270m"
EVAL_WINDOWS = 2  # windows of the embedded 'eval' text (few: a window costs minutes on the shared 2 cores)
EVAL_SEQLEN = 1024  # tokens per window: the [seqlen, 262144] fp32 logits of a 2048-token window (2 GiB, plus copies
#                     in the loss) got a perplexity pass OOM-killed on the shared 24 GiB machine
PROMPT = "The capital of France is"
LLAMA_PPL_CHARS, LLAMA_PPL_CTX, LLAMA_PPL_CHUNKS = 60_000, 1024, 4  # llama-perplexity: text, chunk, chunks


def source_gguf() -> Path:
    """The assembled source GGUF (the template of the GGUF export: same model, same vocabulary)."""
    from matquant.models.assembled import assembled_model_path

    return assembled_model_path(MODEL, progress=False)


def steps(w: Path) -> dict[str, list[str]]:
    """Step name -> argv (in run order). `w` is the work folder of this script."""
    q = ["matquant", "quantize", "--model", MODEL, "--overwrite"]
    ev = ["--windows", str(EVAL_WINDOWS), "--seqlen", str(EVAL_SEQLEN), "--bits", "8,6,4,3,2"]
    me = [sys.executable, str(Path(__file__).resolve())]
    ck = lambda name: str(w / name)  # noqa: E731
    return {
        "fp32": me + ["fp32", "--json", ck("fp32.json")],
        "rtn": q + ["--method", "rtn", "--out", ck("rtn")],
        "eval-rtn": ["matquant", "eval", ck("rtn"), *ev, "--json", ck("eval-rtn.json")],
        "export-gguf": ["matquant", "export", ck("rtn"), "--format", "gguf", "--bits", "4", "--template",
                        str(source_gguf()), "--out", ck("rtn-int4.gguf")],
        "export-gguf-int8": ["matquant", "export", ck("rtn"), "--format", "gguf", "--bits", "8", "--template",
                             str(source_gguf()), "--out", ck("rtn-int8.gguf")],
        "ppl-gguf-int8": me + ["fp32", "--model", ck("rtn-int8.gguf"), "--json", ck("ppl-gguf-int8.json")],
        "ppl-gguf-int4": me + ["fp32", "--model", ck("rtn-int4.gguf"), "--json", ck("ppl-gguf-int4.json")],
        "llama-ppl": me + ["llama-ppl", str(source_gguf()), ck("rtn-int8.gguf"), ck("rtn-int4.gguf"),
                           "--json", ck("llama-ppl.json")],
        "export-ct": ["matquant", "export", ck("rtn"), "--format", "compressed-tensors", "--bits", "4",
                      "--out", ck("rtn-int4-ct")],
        "export-hf": ["matquant", "export", ck("rtn"), "--format", "hf", "--bits", "4", "--out", ck("rtn-int4-hf")],
        "load": me + ["load", ck("rtn"), "--bits", "4"],
        "generate": ["matquant", "generate", ck("rtn"), "--bits", "4", "--prompt", PROMPT, "--no-chat",
                     "--max-new-tokens", "24"],
        "quality": q + ["--recipe", "quality", "--out", ck("quality")],
        "eval-quality": ["matquant", "eval", ck("quality"), *ev, "--json", ck("eval-quality.json")],
        "matgptq": q + ["--method", "matgptq", "--out", ck("matgptq")],
        "eval-matgptq": ["matquant", "eval", ck("matgptq"), *ev, "--json", ck("eval-matgptq.json")],
        "gptq": q + ["--method", "gptq", "--out", ck("gptq")],
        "eval-gptq": ["matquant", "eval", ck("gptq"), *ev, "--json", ck("eval-gptq.json")],
        "omniquant": q + ["--method", "omniquant", "--epochs", "1", "--out", ck("omniquant")],
        "eval-omniquant": ["matquant", "eval", ck("omniquant"), *ev, "--json", ck("eval-omniquant.json")],
        "qat": q + ["--method", "qat", "--steps", "4", "--calib-windows", "8", "--calib-seqlen", "256",
                    "--save-every", "0", "--out", ck("qat")],
        "generate-quality": ["matquant", "generate", ck("quality"), "--bits", "4", "--prompt", PROMPT, "--no-chat",
                             "--max-new-tokens", "24"],
    }


def _size(path: Path) -> int | None:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return None


def run_step(name: str, argv: list[str], w: Path) -> dict:
    """Run one step as a child process; wall time and the child's own peak RSS (os.wait4)."""
    log = w / f"{name}.log"
    t0 = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"})
        _, status, ru = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    out = next((Path(a) for k, a in zip(argv, argv[1:]) if k == "--out"), None)
    text = log.read_text(errors="replace")
    return {"step": name, "cmd": shlex.join(argv), "rc": rc, "seconds": round(time.time() - t0, 1),
            "peak_rss_gib": round(ru.ru_maxrss / 2**20, 3), "out_bytes": _size(out) if out else None,
            "tail": text[-1500:], "machine": f"{platform.node()} ({os.cpu_count()} cpus)",
            "at": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}


def done(results: Path) -> dict[str, dict]:
    rows = {}
    if results.exists():
        for line in results.read_text().splitlines():
            r = json.loads(line)
            rows[r["step"]] = r
    return rows


def claim(w: Path, name: str) -> bool:
    """Take step `name` for this process (a claim file with its pid), so runners started side by side never run
    the same step; a claim whose process is gone is taken over."""
    f = w / f"{name}.claim"
    for _ in range(2):
        try:
            fd = os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(f.read_text() or 0), 0)
                return False  # its runner is alive
            except (ProcessLookupError, ValueError):
                f.unlink(missing_ok=True)  # a dead runner's claim
                continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return True
    return False


def cmd_run(a) -> int:
    w = work_path("gemma3", work=a.work)
    w.mkdir(parents=True, exist_ok=True)
    results = w / "results.jsonl"
    all_steps = steps(w)
    names = a.steps.split(",") if a.steps else list(all_steps)
    unknown = [n for n in names if n not in all_steps]
    if unknown:
        raise SystemExit(f"unknown steps {unknown}; `gemma3_cli.py list` shows them.")
    failed = 0
    for n in names:
        if not a.again and done(results).get(n, {}).get("rc") == 0:  # re-read: another runner may have done it
            print(f"{n}: done before, skipped")
            continue
        if not claim(w, n):
            print(f"{n}: being run by another runner, skipped")
            continue
        try:
            print(f"{n}: {shlex.join(all_steps[n])}", flush=True)
            r = run_step(n, all_steps[n], w)
            with open(results, "a") as f:
                f.write(json.dumps(r) + "\n")
        finally:
            (w / f"{n}.claim").unlink(missing_ok=True)
        failed += r["rc"] != 0
        print(f"{n}: rc {r['rc']}, {r['seconds']} s, peak RSS {r['peak_rss_gib']} GiB, out {r['out_bytes']} bytes"
              + ("" if r["rc"] == 0 else "\n" + r["tail"][-800:]), flush=True)
    return 1 if failed else 0


def cmd_fp32(a) -> int:
    """The perplexity of the source model (or of `--model`, e.g. an exported GGUF, read by transformers' GGUF
    loader) on the windows `matquant eval --windows EVAL_WINDOWS --seqlen EVAL_SEQLEN` scores."""
    from matquant.data import token_windows
    from matquant.eval.perplexity import perplexity
    from matquant.format.atomic import atomic_write_json
    from matquant.models import load_model

    model, tok, _ = load_model(a.model)
    windows = token_windows(tok, "eval", EVAL_SEQLEN, EVAL_WINDOWS)
    r = perplexity(model, windows, progress=False)
    row = {"bits": "fp32" if a.model == MODEL else Path(a.model).name, "ppl": r.ppl, "nll": r.nll,
           "tokens": r.tokens, "seqlen": r.seqlen, "params": sum(p.numel() for p in model.parameters())}
    print(row)
    atomic_write_json(a.json, [row])
    return 0


def cmd_llama_ppl(a) -> int:
    """llama.cpp's `llama-perplexity` (binary folder: $LLAMA_CPP_BIN) on each GGUF, over the first LLAMA_PPL_CHARS
    characters of the embedded eval text, LLAMA_PPL_CTX-token chunks: its final estimate per file."""
    import re

    from matquant.data.text import get_text
    from matquant.format.atomic import atomic_write_json

    bin_dir = os.environ.get("LLAMA_CPP_BIN")
    exe = Path(bin_dir, "llama-perplexity") if bin_dir else None
    if exe is None or not exe.is_file():
        raise SystemExit("set LLAMA_CPP_BIN to the folder holding llama.cpp's llama-perplexity binary.")
    text = Path(a.json).with_suffix(".txt")
    text.write_text(get_text("eval")[:LLAMA_PPL_CHARS])
    env = {**os.environ, "LD_LIBRARY_PATH": f"{bin_dir}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    rows = []
    for g in a.ggufs:
        out = subprocess.run([str(exe), "-m", g, "-f", str(text), "-c", str(LLAMA_PPL_CTX), "-b", str(LLAMA_PPL_CTX),
                              "--chunks", str(LLAMA_PPL_CHUNKS), "-t", str(os.cpu_count() or 1)],
                             capture_output=True, text=True, env=env)
        m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out.stdout + out.stderr)
        rows.append({"gguf": Path(g).name, "ppl": float(m.group(1)) if m else None,
                     "stderr": float(m.group(2)) if m else None, "rc": out.returncode,
                     "ctx": LLAMA_PPL_CTX, "chunks": LLAMA_PPL_CHUNKS})
        print(rows[-1], flush=True)
    atomic_write_json(a.json, rows)
    return 0 if all(r["ppl"] is not None for r in rows) else 1


def cmd_load(a) -> int:
    """matquant.load(ckpt, bits=...) on the packed CPU runtime, then one greedy generation."""
    import torch

    import matquant

    t0 = time.time()
    model, tok = matquant.load(a.checkpoint, bits=a.bits)
    t_load = time.time() - t0
    ids = tok(PROMPT, return_tensors="pt")
    t0 = time.time()
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
    t_gen = time.time() - t0
    text = tok.decode(out[0][ids.input_ids.shape[1]:], skip_special_tokens=True)
    print(json.dumps({"load_s": round(t_load, 1), "generate_s": round(t_gen, 1), "tokens": out.shape[1] -
                      ids.input_ids.shape[1], "text": text}))
    return 0


def cmd_table(a) -> int:
    w = work_path("gemma3", work=a.work)
    rows = done(w / "results.jsonl")
    print("| step | exit | wall s | peak RSS GiB | output MB |\n|---|---|---|---|---|")
    for r in rows.values():
        mb = f"{r['out_bytes'] / 1e6:.1f}" if r.get("out_bytes") else "–"
        print(f"| {r['step']} | {r['rc']} | {r['seconds']} | {r['peak_rss_gib']} | {mb} |")
    fp = json.loads((w / "fp32.json").read_text())[0]["ppl"] if (w / "fp32.json").exists() else None
    print(f"\nfp32: {fp}\n\n| checkpoint | int8 | int6 | int4 | int3 | int2 |\n|---|---|---|---|---|---|")
    for name in ("rtn", "gptq", "matgptq", "quality", "omniquant"):
        f = w / f"eval-{name}.json"
        if not f.exists():
            continue
        by_bits = {r["bits"]: r["ppl"] for r in json.loads(f.read_text())}
        cells = [f"{by_bits[b]:.3f}" + (f" ({by_bits[b] / fp:.3f}×)" if fp else "") if b in by_bits else "–"
                 for b in (8, 6, 4, 3, 2)]
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--steps", default=None, help="comma-separated step names (default: all)")
    r.add_argument("--again", action="store_true", help="rerun steps that succeeded before")
    add_work_option(r)
    li = sub.add_parser("list")
    add_work_option(li)
    t = sub.add_parser("table")
    add_work_option(t)
    f = sub.add_parser("fp32")
    f.add_argument("--model", default=MODEL, help="model source (default: the Gemma-3-270M source); a .gguf file")
    f.add_argument("--json", required=True)
    lp = sub.add_parser("llama-ppl")
    lp.add_argument("ggufs", nargs="+")
    lp.add_argument("--json", required=True)
    lo = sub.add_parser("load")
    lo.add_argument("checkpoint")
    lo.add_argument("--bits", type=int, default=4)
    a = p.parse_args(argv)
    if a.cmd == "list":
        for n, argv_ in steps(work_path("gemma3", work=a.work)).items():
            print(f"{n}: {shlex.join(argv_)}")
        return 0
    return {"run": cmd_run, "table": cmd_table, "fp32": cmd_fp32, "load": cmd_load, "llama-ppl": cmd_llama_ppl}[
        a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
