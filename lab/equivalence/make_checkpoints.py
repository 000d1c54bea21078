"""Build the equivalence set: the same `matquant quantize` commands on fixed inputs, every method x both slicing
modes on a tiny Llama (and, with --real, the demo's options and `--recipe quality` on SmolLM2 at a fixed thread
count), one checkpoint folder per case under OUT/. Run it with two versions of matquant (e.g. a git worktree of the
old commit on PYTHONPATH) and compare the two OUT trees with compare_checkpoints.py: behaviour-preserving changes
must give bit-identical codes and parameters.

    python lab/equivalence/make_checkpoints.py OUT [--real] [--only NAME_SUBSTRING] [--flags="--in-memory"]

Streamed vs in-memory (issue 26): run it twice from the same tree, once with --flags=--in-memory, and compare.
`--real-models` adds every method x both slicing modes on real models (e.g. smollm2-135m qwen2.5-coder-0.5b);
`--real-calib MODEL=WINDOWSxSEQLEN` gives a model's cases a smaller calibration set (a case's own calibration
flags win), `--real-modules MODEL=REGEX` restricts a model's targets (e.g. the first and last blocks), `--threads`
sets their thread count and `--jobs N` runs N cases at a time. Each case's log, wall time, CPU time and peak RSS go
to OUT/_logs/ and OUT/_runs.jsonl.

Every case names its method explicitly (`--method` or `--recipe`), so the result does not depend on the defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

TEXT = ("The quick brown fox jumps over the lazy dog. Matryoshka dolls nest inside each other, "
        "and so do the bits of an integer: the top two bits of an eight bit code are a two bit code. ")

# name -> flags (each run at --slicing paper and nested)
TINY_CASES = {
    "rtn": ["--method", "rtn"],
    "rtn_mse_own": ["--method", "rtn", "--clip", "mse", "--slice-params", "own"],
    "rtn_weighted": ["--method", "rtn", "--clip", "weighted"],
    "rtn_rotate_input": ["--method", "rtn", "--rotate", "input"],
    "gptq": ["--method", "gptq"],
    "gptq4_refit_weighted_own": ["--method", "gptq", "--bits-master", "4", "--refit", "--clip", "weighted",
                                 "--clip-lambdas", "1,0,0", "--slice-params", "own"],
    "matgptq": ["--method", "matgptq"],
    "matgptq_search_actorder": ["--method", "matgptq", "--group-params", "search", "--act-order",
                                "--error-feedback", "mean", "--propagate", "fp"],
    "matgptq_refit_842": ["--method", "matgptq", "--refit", "--bits-list", "8,4,2", "--lambdas", "1,1,2"],
    "matgptq_rotate_residual": ["--method", "matgptq", "--rotate", "residual"],
    "recipe_quality": ["--recipe", "quality"],
    "recipe_balanced": ["--recipe", "balanced"],
    "omniquant": ["--method", "omniquant", "--epochs", "1"],
    "omniquant_let_mse_own": ["--method", "omniquant", "--epochs", "1", "--let", "--clip", "mse",
                              "--slice-params", "own", "--loss-balance", "initial"],
    "qat": ["--method", "qat", "--steps", "3"],
    "qat_distill_learnable": ["--method", "qat", "--steps", "3", "--distill", "[8,4,2,8->2]", "--qparams",
                              "learnable"],
}
EXTRA: list[str] = []  # --flags
TINY_COMMON = ["--scope", "ffn+attn", "--group-size", "32", "--calib-windows", "4", "--calib-seqlen", "32",
               "--threads", "1"]

# SmolLM2: the demo's quantization (MatGPTQ, FFN, group 64, 2 threads) and the quality recipe
REAL_CASES = {
    "smollm2_demo_matgptq": ["--method", "matgptq", "--threads", "2"],
    "smollm2_recipe_quality": ["--recipe", "quality", "--threads", "2"],
}


def tiny_model_folder(folder: Path) -> Path:
    """A tiny random Llama (seed 0) with a byte-level BPE tokenizer, saved as an HF folder."""
    import torch
    import transformers as T
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        tie_word_embeddings=True)
    model = T.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT * 40], trainer)
    fast = T.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


# every PTQ method on a real model (--real-models), each at --slicing paper and nested; small calibration sets
REAL_METHOD_CASES = {
    "rtn": ["--method", "rtn"],
    "rtn_weighted_own": ["--method", "rtn", "--clip", "weighted", "--slice-params", "own"],
    "gptq": ["--method", "gptq"],
    "matgptq": ["--method", "matgptq"],
    "quality": ["--recipe", "quality"],
    "omniquant": ["--method", "omniquant", "--epochs", "1", "--calib-windows", "2", "--calib-seqlen", "128"],
}


def run_case(out: Path, name: str, flags: list[str]) -> float:
    """Run one `matquant quantize` case into out/name (skipped when it exists); its log goes to out/_logs/name.log,
    its wall time, CPU time (user + sys) and peak RSS to out/_runs.jsonl."""
    if (out / name / "config.json").exists():
        print(f"{name}: exists, skipped", flush=True)
        return 0.0
    cmd = [sys.executable, "-m", "matquant", "quantize", *flags, *EXTRA, "--out", str(out / name), "--overwrite"]
    logs = out / "_logs"
    logs.mkdir(exist_ok=True)
    t0 = time.time()
    with open(logs / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONHASHSEED": "0"})
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.time() - t0
    if proc.returncode != 0:
        tail = (logs / f"{name}.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"{name} failed:\n{' '.join(cmd)}\n{tail}")
    row = {"case": name, "cmd": cmd[1:], "wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
           "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3)}
    with open(out / "_runs.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"{name}: {wall:.0f}s wall, {row['cpu_s']:.0f}s CPU, {row['peak_rss_gib']:.2f} GiB peak RSS", flush=True)
    return wall


def per_model(pairs: list[str], what: str) -> dict[str, str]:
    """{model: value} from MODEL=VALUE arguments."""
    out = {}
    for item in pairs:
        model, eq, value = item.partition("=")
        if not eq or not value:
            raise SystemExit(f"{what} takes MODEL=VALUE, got {item!r}")
        out[model] = value
    return out


def calib_flags(spec: str | None) -> list[str]:
    """--calib-windows/--calib-seqlen flags from 'WINDOWSxSEQLEN' (None: none)."""
    if not spec:
        return []
    windows, _, seqlen = spec.partition("x")
    if not windows.isdigit() or not seqlen.isdigit():
        raise SystemExit(f"--real-calib takes MODEL=WINDOWSxSEQLEN, e.g. qwen2.5-coder-0.5b=8x256; got {spec!r}")
    return ["--calib-windows", windows, "--calib-seqlen", seqlen]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--real", action="store_true", help="also the SmolLM2 cases (minutes each)")
    p.add_argument("--only", default=None, help="run only cases whose name contains this")
    p.add_argument("--flags", default="", help="more flags for every command, e.g. --flags=--in-memory")
    p.add_argument("--real-models", nargs="*", default=[], help="every method x slicing on these models")
    p.add_argument("--real-calib", nargs="*", default=[], metavar="MODEL=WxS",
                   help="calibration windows x seqlen for a real model's cases (a case's own flags win)")
    p.add_argument("--real-modules", nargs="*", default=[], metavar="MODEL=REGEX",
                   help="quantize only these layers of a real model (--modules)")
    p.add_argument("--threads", type=int, default=2, help="torch threads of the real-model cases (default 2)")
    p.add_argument("--exclude", nargs="*", default=[], metavar="CASE", help="real-model cases not to run")
    p.add_argument("--jobs", type=int, default=1, help="real-model cases run at a time (default 1)")
    args = p.parse_args(argv)
    EXTRA[:] = args.flags.split()
    args.out.mkdir(parents=True, exist_ok=True)
    model = tiny_model_folder(args.out / "_tiny_model")
    calib = args.out / "_calib.txt"
    calib.write_text(TEXT * 40)
    for name, flags in TINY_CASES.items():
        for slicing in ("paper", "nested"):
            case = f"tiny_{name}_{slicing}"
            if args.only and args.only not in case:
                continue
            run_case(args.out, case, [*flags, *TINY_COMMON, "--slicing", slicing, "--model", str(model),
                                      "--calib-text", str(calib)])
    if args.real:
        for name, flags in REAL_CASES.items():
            if not args.only or args.only in name:
                run_case(args.out, name, flags)
    calibs, modules = per_model(args.real_calib, "--real-calib"), per_model(args.real_modules, "--real-modules")
    jobs = []
    for real in args.real_models:
        common = [*calib_flags(calibs.get(real)), *(["--modules", modules[real]] if real in modules else [])]
        for slicing in ("paper", "nested"):  # every method once before the second slicing mode
            for name, flags in REAL_METHOD_CASES.items():
                case = f"{real}_{name}_{slicing}"
                if (not args.only or args.only in case) and case not in args.exclude:
                    jobs.append((case, [*common, *flags, "--model", real, "--slicing", slicing,
                                        "--threads", str(args.threads)]))
    failed = 0
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # a failed case is reported; the others still run
        for fut in [pool.submit(run_case, args.out, *job) for job in jobs]:
            try:
                fut.result()
            except SystemExit as e:
                print(e, file=sys.stderr, flush=True)
                failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
