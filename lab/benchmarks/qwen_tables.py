"""Qwen2.5-Coder-0.5B tables (issue 14, section 4): fp32 reference and every slice of the default method (MatGPTQ)
and RTN, at FFN g128, FFN+attention g128 and FFN g64, with quantization time and peak RSS.

Resumable: every measurement is appended to a JSONL results store (matquant.experiments.store; one line per
(configuration, bits, eval windows), keyed by the hash of its config) the moment it is measured; a re-run skips
what is there. Calibrated quantizations are saved under --ckpt-dir, so a kill during the evaluation of a config does
not repeat its quantization (the stored quantization time/RSS come from the run that quantized it).

Everything uses the library's own pieces: `quantize_model` with the method defaults of `matquant quantize`
(calibration = `matquant.commands.quantize.calibration`, i.e. 32 x 512 tokens of 'calib' for matgptq), slicing =
the checkpoint default (nested), `matquant.eval.perplexity.perplexity` on the first N x 2048 windows of 'eval'.

    OMP_NUM_THREADS=1 python lab/benchmarks/qwen_tables.py run --configs fp32,rtn-ffn-g128,matgptq-ffn-g128
    OMP_NUM_THREADS=1 python lab/benchmarks/qwen_tables.py run --configs quality-ffn-g128   # a recipe (--recipe quality)
    OMP_NUM_THREADS=1 python lab/benchmarks/qwen_tables.py run --configs 'quality-ffn-g128+clip_lambdas=4096:16:4:1'
    python lab/benchmarks/qwen_tables.py table          # markdown tables from the store

Peak RSS: the process's high-water mark (VmHWM) reset with /proc/self/clear_refs just before quantizing, read just
after; it includes the fp32 source model the process keeps in memory (recorded separately as rss_before_gib).
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _paths import add_work_option, work_path  # noqa: E402
from matquant.experiments.store import ResultStore, config_key, utc_now  # noqa: E402

MODEL = "qwen2.5-coder-0.5b"
STORE = ROOT / "lab" / "results" / "qwen_tables.jsonl"
DEFAULT_CONFIGS = ("fp32", "rtn-ffn-g128", "matgptq-ffn-g128", "rtn-ffn+attn-g128", "matgptq-ffn+attn-g128",
                   "rtn-ffn-g64", "matgptq-ffn-g64")
SCOPE_NAMES = {"ffn": "FFN", "ffn+attn": "FFN+attention"}


def parse_config(name: str) -> dict | None:
    """'matgptq-ffn+attn-g128' -> {method, scope, group_size}; a recipe name in place of the method
    ('quality-ffn-g128') -> the recipe's options as well (method, clip, ...); 'fp32' -> None."""
    from matquant.algorithms.recipes import RECIPES

    if name == "fp32":
        return None
    full = name  # 'quality-ffn-g128+clip_lambdas=4096:16:4:1': extra method options after the group size
    head_opts = re.fullmatch(r"(.*?-g\d+)(?:\+(.*))?", name)
    name, rest = head_opts.groups() if head_opts else (name, None)
    extra = {}
    for o in rest.split("+") if rest is not None else []:
        k, _, v = o.partition("=")
        if not k or not v:
            raise SystemExit(f"bad option {o!r} in configuration {full!r}; use +KEY=VALUE (lists as a:b:c).")
        vals = [float(x) if re.fullmatch(r"-?[0-9.]+", x) else x for x in v.split(":")]
        extra[k] = vals if len(vals) > 1 else vals[0]
    m = re.fullmatch(rf"(rtn|matgptq|gptq|omniquant|{'|'.join(RECIPES)})-(ffn|ffn\+attn|attn|all)-g(\d+)", name)
    if not m:
        raise SystemExit(f"unknown configuration {name!r}; use fp32 or METHOD-SCOPE-gN or RECIPE-SCOPE-gN, "
                         "e.g. matgptq-ffn-g128, quality-ffn-g128.")
    head = {"method": m.group(1)} if m.group(1) not in RECIPES else {**RECIPES[m.group(1)], "recipe": m.group(1)}
    return {**head, **extra, "scope": m.group(2), "group_size": int(m.group(3))}


def _status_gib(field: str) -> float:
    kb = int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
    return kb / 2**20


def reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM := current RSS


def measurement(name: str, bits, windows: int, seqlen: int) -> dict:
    q = parse_config(name)
    return {"model": MODEL, "config": name, "quant": q, "slicing": None if q is None else "nested",
            "bits": bits, "eval": {"text": "eval", "windows": windows, "seqlen": seqlen}}


def saved_dir(ckpt_dir: Path, name: str) -> Path:
    """Where the calibrated quantization of configuration `name` is kept: its name plus the hash of its resolved
    options, so a recipe whose options changed since (e.g. `quality` gaining slice_params) is quantized anew."""
    return Path(ckpt_dir) / f"{name}.{config_key(parse_config(name))[:8]}"


def quantize(src, tok, name: str, ckpt_dir: Path, log, in_place: bool = False):
    """(model, quant info): loaded from saved_dir(ckpt_dir, name) if an earlier run saved it, else quantized now (a
    copy of `src`, or `src` itself with in_place, which saves one fp32 model of memory)."""
    import torch

    from matquant.algorithms import Calibration, make_config, needs_calibration, quantize_model
    from matquant.format.checkpoint import load_checkpoint, save_checkpoint

    q = parse_config(name)
    ck = saved_dir(ckpt_dir, name)
    if (ck / "config.json").exists() and (ck / "quant_info.json").exists():
        log(f"{name}: loading the saved quantization {ck}")
        model, _, _ = load_checkpoint(ck)
        return model, json.loads((ck / "quant_info.json").read_text())
    extra = {k: v for k, v in q.items() if k not in ("method", "scope", "group_size", "recipe", "calib_windows")}
    config = make_config(q["method"], group_size=q["group_size"], scope=q["scope"], **extra)
    calib = Calibration(windows=q.get("calib_windows")).token_windows(tok, config) \
        if config.needs_calibration() else None
    rss0 = _status_gib("VmRSS")
    reset_peak_rss()
    t0, c0 = time.time(), time.process_time()
    model = src if in_place else copy.deepcopy(src)
    qcfg = quantize_model(model, q["method"], group_size=q["group_size"], scope=q["scope"], calib=calib,
                          progress=False, **extra)
    model.eval()
    info = {"quantize_seconds": round(time.time() - t0, 1), "quantize_cpu_seconds": round(time.process_time() - c0, 1),
            "peak_rss_gib": round(_status_gib("VmHWM"), 3), "rss_before_gib": round(rss0, 3),
            "calib": None if calib is None else list(calib.shape), "threads": torch.get_num_threads(),
            "layers": len(qcfg.modules), "quantized_at": utc_now()}
    log(f"{name}: quantized {len(qcfg.modules)} layers in {info['quantize_seconds']:.0f}s "
        f"(peak RSS {info['peak_rss_gib']:.2f} GiB, {info['rss_before_gib']:.2f} before)")
    if needs_calibration(q["method"], q):
        save_checkpoint(model, tok, ck, qcfg, overwrite=True)
        (ck / "quant_info.json").write_text(json.dumps(info))
    return model, info


def run(a) -> None:
    import os

    import torch

    from matquant.data import token_windows
    from matquant.eval.perplexity import perplexity
    from matquant.models import load_model
    from matquant.nn.bits import effective_bits, set_bits

    def log(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}  (load {os.getloadavg()[0]:.1f})", flush=True)

    torch.set_num_threads(a.threads)
    store = ResultStore(a.store)
    done = store.keys()
    bits = [int(b) for b in a.bits.split(",")]
    configs = a.configs.split(",")
    for c in configs:
        parse_config(c)
    todo = {c: [b for b in (["fp32"] if c == "fp32" else bits)
                if config_key(measurement(c, b, a.eval_windows, a.seqlen)) not in done] for c in configs}
    todo = {c: bs for c, bs in todo.items() if bs}
    log(f"{sum(map(len, todo.values()))} measurement(s) to run: {todo}")
    if not todo:
        return
    t0 = time.time()
    src, tok, s = load_model(MODEL)
    log(f"loaded {s.describe()} in {time.time() - t0:.0f}s, RSS {_status_gib('VmRSS'):.2f} GiB")
    ev = token_windows(tok, "eval", a.seqlen, a.eval_windows)
    if a.quantize_only:
        todo = {c: bs for c, bs in todo.items() if c != "fp32" and not (saved_dir(a.ckpt_dir, c) / "quant_info.json").exists()}
    for c, bs in todo.items():
        if a.quantize_only:  # one config per process: the source model is quantized in place
            quantize(src, tok, c, Path(a.ckpt_dir), log, in_place=True)
            break
        model, info = (src, {}) if c == "fp32" else quantize(src, tok, c, Path(a.ckpt_dir), log)
        for b in bs:
            eff = 32.0
            if b != "fp32":
                set_bits(model, b, "nested")
                eff = round(effective_bits(model), 4)
            te = time.time()
            r = perplexity(model, ev, desc=f"{c} int{b}")
            secs = round(time.time() - te, 1)
            cfg = measurement(c, b, a.eval_windows, a.seqlen)
            store.append(cfg, {**r.to_dict(), "effective_bits": eff, **info, "eval_seconds": secs,
                               "load_avg_1min": round(os.getloadavg()[0], 2)},
                         seconds=secs)
            log(f"{c} {b}: ppl {r.ppl:.4f} ({secs:.0f}s for {ev.shape[0]} windows)")
        if model is not src:
            del model


def table(a) -> None:
    recs = ResultStore(a.store).records()
    ref = {r["config"]["eval"]["windows"]: r["result"]["ppl"] for r in recs if r["config"]["config"] == "fp32"}
    print(f"fp32 reference: {', '.join(f'{v:.4f} ({w} x 2048-token windows)' for w, v in sorted(ref.items()))}\n")
    rows: dict = {}
    for r in recs:
        c = r["config"]
        if c["quant"] is None:
            continue
        label = c["config"]
        now = json.loads(json.dumps(parse_config(c["config"])))  # tuples as the store holds them: lists
        if c["quant"] != now:  # a recipe whose options changed after this row was measured
            then = {k: v for k, v in c["quant"].items() if k not in ("scope", "group_size", "recipe")}
            label += " [then: " + ", ".join(f"{k}={v}" for k, v in then.items()) + "]"
        rows.setdefault((c["quant"]["scope"], c["quant"]["group_size"], label, c["eval"]["windows"]),
                        {})[c["bits"]] = r["result"]
    bits = [8, 6, 4, 3, 2]
    print("| method | scope | group | eval windows | " + " | ".join(f"int{b}" for b in bits)
          + " | quantize s | peak RSS GiB (before) |")
    print("|---|---|---|---|" + "---|" * len(bits) + "---|---|")
    for (scope, g, name, w), res in sorted(rows.items(), key=lambda kv: (kv[0][0] != "ffn", -kv[0][1], kv[0][2])):
        head, _, then = name.partition(" [then: ")
        method = head.split("-")[0] + "".join(f" +{o}" for o in re.findall(r"\+([a-z_]+=[^+]*)", head)) \
            + (f" [then: {then}" if then else "")
        fp = ref.get(w)
        cells = []
        for b in bits:
            if b not in res:
                cells.append("—")
            else:
                p = res[b]["ppl"]
                cells.append(f"{p:.3f} ({p / fp:.3f}×)" if fp else f"{p:.3f}")
        any_r = next(iter(res.values()))
        print(f"| {method} | {SCOPE_NAMES.get(scope, scope)} | {g} | {w} | " + " | ".join(cells)
              + f" | {any_r.get('quantize_seconds', '—')} | {any_r.get('peak_rss_gib', '—')} "
              f"({any_r.get('rss_before_gib', '—')}) |")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--configs", default=",".join(DEFAULT_CONFIGS))
    r.add_argument("--bits", default="8,6,4,3,2")
    r.add_argument("--eval-windows", type=int, default=6)
    r.add_argument("--seqlen", type=int, default=2048)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--store", default=str(STORE))
    add_work_option(r, "the saved quantizations (WORK/qwen_tables)")
    r.add_argument("--ckpt-dir", default=None, help="saved quantizations (default: WORK/qwen_tables)")
    r.add_argument("--quantize-only", action="store_true",
                   help="only quantize and save the calibrated configs (a later run evaluates them)")
    t = sub.add_parser("table")
    t.add_argument("--store", default=str(STORE))
    a = ap.parse_args()
    if a.cmd == "run":
        a.ckpt_dir = a.ckpt_dir or str(work_path("qwen_tables", work=a.work))
    run(a) if a.cmd == "run" else table(a)


if __name__ == "__main__":
    main()
