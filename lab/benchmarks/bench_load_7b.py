"""Peak memory and wall time of `matquant.load(ckpt, bits=r, keep_master=False)` on a checkpoint of a RANDOM-weight
model with Llama-2-7B's shapes (issue 26), and of a greedy `generate` of 16 tokens; random weights measure memory and
speed only, never quality.

    python lab/benchmarks/bench_load_7b.py --layers 4 [--work DIR] [--bits 4,2] [--compare] [--out results.json]
    python lab/benchmarks/bench_load_7b.py --layers 32 --checkpoint CKPT     # a checkpoint made elsewhere

Steps (each skipped when its output exists):
1. `make_random_model.py --arch llama2-7b --layers N` -> WORK/random-llama2-7b-NL (bf16 shards);
2. `matquant quantize --method rtn --model that --out WORK/load7b-rtn-NL` (whatever pipeline the installed
   matquant runs; its peak RSS and wall time are recorded too);
3. for each `--bits` r, a fresh Python process loads the checkpoint with `keep_master=False` (each quantized layer
   packed as it is read) and generates 16 tokens; with `--compare` also the former path in another process (the
   whole checkpoint loaded with its uint8 master, then packed and the master dropped: `load_checkpoint` +
   `drop_master`), which must give identical logits.

Reported per run: wall time of the load and of the generate; the process's peak RSS (ru_maxrss) and its RSS after
the imports alone (the Python/torch/transformers baseline); the bytes the loaded model holds
(`nn.memory.resident_bytes`: packed codes, scales and zeros of the quantized layers + the embeddings, norms and head
in fp32) and its quantized layers' share; the int4 code bytes (weights / 2) and the bytes of the largest decoder
block as stored in the checkpoint ("one block"). The target of issue 26: peak - baseline <= 1.2 x the model's
int4 bytes + one block.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _paths import add_work_option, work_path  # noqa: E402

PROMPT = "The capital of France is"

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(int(sys.argv[4]))
import transformers, matquant
from matquant.nn.memory import resident_bytes, quantized_resident_bytes
def rss_peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def rss_now():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
ckpt, bits, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
base_now, base_peak = rss_now(), rss_peak()
t0 = time.perf_counter()
if mode == "stream":
    model, tok = matquant.load(ckpt, bits=bits, keep_master=False)
else:  # the former path: everything with its master codes, then pack and drop
    from matquant.format.checkpoint import load_checkpoint
    from matquant.nn.bits import set_backend
    from matquant.nn.memory import drop_master
    model, tok, _ = load_checkpoint(ckpt, bits=bits)
    set_backend(model, "auto")
    drop_master(model)
load_s = time.perf_counter() - t0
peak_load = rss_peak()
ids = tok(sys.argv[5], return_tensors="pt").input_ids
with torch.no_grad():
    logits = model(ids).logits[0, -1]
    t1 = time.perf_counter()
    out = model.generate(ids, max_new_tokens=16, min_new_tokens=16, do_sample=False)
gen_s = time.perf_counter() - t1
if len(sys.argv) > 6:
    from safetensors.torch import save_file
    save_file({"logits": logits.contiguous()}, sys.argv[6])
print("@@" + json.dumps({"mode": mode, "bits": bits, "load_s": round(load_s, 2), "generate_16_s": round(gen_s, 2),
                         "new_tokens": int(out.shape[1] - ids.shape[1]),
                         "baseline_rss": base_now, "baseline_peak": base_peak, "peak_rss_after_load": peak_load,
                         "peak_rss": rss_peak(), "rss_end": rss_now(), "resident_bytes": resident_bytes(model),
                         "quantized_resident_bytes": quantized_resident_bytes(model)}))
"""


def run_timed(cmd: list[str], env=None) -> dict:
    """Run cmd under /usr/bin/time -v when present; returns wall seconds, peak RSS bytes (or None) and stdout."""
    timev = Path("/usr/bin/time").exists()
    full = (["/usr/bin/time", "-v"] if timev else []) + cmd
    t0 = time.perf_counter()
    p = subprocess.run(full, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({p.returncode}):\n{p.stderr[-3000:]}")
    peak = None
    for ln in p.stderr.splitlines():
        if "Maximum resident set size" in ln:
            peak = int(ln.split(":")[1]) * 1024
    return {"wall_s": round(wall, 1), "peak_rss": peak, "stdout": p.stdout}


def checkpoint_facts(ckpt: Path) -> dict:
    """Weights of the quantized layers, their int4 code bytes, and the largest decoder block as stored."""
    from matquant.format.checkpoint import merged_header, read_quant_config, weight_headers

    _, q = read_quant_config(ckpt)
    header = merged_header(weight_headers(ckpt))
    n_weights = sum(header[f"{m}.qweight"][1][0] * header[f"{m}.qweight"][1][1] for m in q.modules)
    blocks: dict[str, int] = {}
    total = 0
    for k, (dt, shape) in header.items():
        n = dt.itemsize
        for s in shape:
            n *= s
        total += n
        parts = k.split(".")
        if "layers" in parts:
            i = parts.index("layers")
            blocks[".".join(parts[: i + 2])] = blocks.get(".".join(parts[: i + 2]), 0) + n
    return {"quantized_weights": n_weights, "int4_code_bytes": n_weights // 2, "layers": len(blocks),
            "one_block_bytes": max(blocks.values()), "checkpoint_tensor_bytes": total}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--bits", default="4,2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare", action="store_true", help="also run the former load path (identical logits)")
    ap.add_argument("--quantize-args", default="", help="extra `matquant quantize` options, e.g. '--in-memory'")
    ap.add_argument("--checkpoint", default=None,
                    help="measure this existing checkpoint instead (steps 1-2 skipped; --layers only names the output)")
    ap.add_argument("--out", default=None, help="results JSON (default WORK/bench_load_7b-NL.json)")
    add_work_option(ap)
    a = ap.parse_args(argv)
    src = work_path(f"random-llama2-7b-{a.layers}L", work=a.work)
    ckpt = Path(a.checkpoint) if a.checkpoint else work_path(f"load7b-rtn-{a.layers}L", work=a.work)
    res: dict = {"layers": a.layers, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "machine": {"cpus": os.cpu_count(), "load": os.getloadavg()}, "runs": []}
    if not src.exists() and not a.checkpoint:
        r = run_timed([sys.executable, str(HERE / "make_random_model.py"), "--arch", "llama2-7b", "--layers",
                       str(a.layers), "--out", str(src), "--no-progress"])
        res["make_model"] = {"wall_s": r["wall_s"], "peak_rss": r["peak_rss"]}
    if not ckpt.exists():
        r = run_timed([sys.executable, "-m", "matquant.cli", "quantize", "--method", "rtn", "--model", str(src),
                       "--out", str(ckpt), *a.quantize_args.split()])
        res["quantize"] = {"wall_s": r["wall_s"], "peak_rss": r["peak_rss"], "args": a.quantize_args}
    res["checkpoint"] = checkpoint_facts(ckpt)
    res["checkpoint"]["files"] = sorted(p.name for p in ckpt.iterdir() if p.suffix == ".safetensors")
    for bits in [int(b) for b in a.bits.split(",")]:
        logits = {}
        for mode in ["stream"] + (["former"] if a.compare else []):
            lp = work_path(f"load7b-logits-{mode}-{bits}.safetensors", work=a.work)
            lp.parent.mkdir(parents=True, exist_ok=True)
            r = run_timed([sys.executable, "-c", CHILD, str(ckpt), str(bits), mode, str(a.threads), PROMPT, str(lp)],
                          env={**os.environ, "OMP_NUM_THREADS": str(a.threads)})
            row = json.loads(next(ln for ln in r["stdout"].splitlines() if ln.startswith("@@"))[2:])
            row.update(wall_s_process=r["wall_s"], peak_rss_time_v=r["peak_rss"])
            row["peak_minus_baseline"] = row["peak_rss"] - row["baseline_rss"]
            row["target_bytes"] = int(1.2 * row["resident_bytes"]) + res["checkpoint"]["one_block_bytes"]
            logits[mode] = lp
            res["runs"].append(row)
            print(json.dumps(row), flush=True)
        if a.compare:
            import torch
            from safetensors.torch import load_file

            same = torch.equal(load_file(str(logits["stream"]))["logits"], load_file(str(logits["former"]))["logits"])
            res["runs"][-1]["logits_identical_to_stream"] = same
            print(f"int{bits}: streaming and former load give identical logits: {same}", flush=True)
    out = Path(a.out) if a.out else work_path(f"bench_load_7b-{a.layers}L.json", work=a.work)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
