"""Kill-anywhere: SIGKILL a command at random moments, rerun the same command, compare with an uninterrupted run.

Commands (on a tiny 2-block Llama saved as a local HF folder, a character tokenizer and a small text file):

    quantize --method matgptq | omniquant (--work-dir) | qat (default OUT.qat-work)
    mixnmatch CKPT --budget B --schedule search (--work-dir, --out JSON)
    experiment GRID (rtn, perplexity only; the JSONL results store + report)

For every kill: a fresh folder, the command started, SIGKILL after a delay drawn uniformly from
[0, 1.2 × the uninterrupted run's time] (so some kills land after the process has finished); then, before the
rerun, the output path must be absent or complete (a checkpoint folder equal to the reference, a JSON file equal
to the reference, store lines all readable except at most a torn last one); then the same command is rerun to
completion and its outputs must equal the uninterrupted run's (checkpoint bytes; bits map and KL; every store
result, nothing lost from before the kill).

Each run is a separate process forked by a multiprocessing forkserver that imported `matquant.cli` once (the
torch/transformers import is paid once, so the kill moments fall in the work, not the import), with 1 thread;
SIGKILL is delivered with os.kill.

    OMP_NUM_THREADS=1 PYTHONPATH=src python lab/benchmarks/kill_anywhere.py --kills 20   # -> WORK/kill-anywhere

WORK is the work folder (--work, else $MATQUANT_WORK, else ./matquant-work; lab/benchmarks/_paths.py).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

from _paths import add_work_option, work_path

COMMANDS = ("quantize-matgptq", "quantize-omniquant", "quantize-qat", "mixnmatch-budget", "experiment-grid")
TEXT = ("The quick brown fox jumps over the lazy dog. Matryoshka dolls nest inside each other, and so do the bits "
        "of an integer: the top two bits of an eight bit code are a two bit code. ") * 30


# ---------------------------------------------------------------- fixtures
def tiny_model_dir(path: Path, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{chr(i): i - 31 for i in range(32, 127)}, "\n": 96}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=256)
    LlamaForCausalLM(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


def setup(root: Path) -> dict:
    from matquant.cli import main

    root.mkdir(parents=True, exist_ok=True)
    env = {"model": tiny_model_dir(root / "model"), "text": root / "text.txt"}
    env["text"].write_text(TEXT)
    ck = root / "rtn-ckpt"  # the checkpoint mixnmatch searches (never modified: no --apply)
    if not ck.exists():
        assert _quiet(main, ["quantize", "--model", str(env["model"]), "--method", "rtn", "--group-size", "32",
                             "--out", str(ck)]) == 0
    env["ckpt"] = ck
    return env


def _quiet(fn, argv):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn(argv)


def command(name: str, env: dict, d: Path, small: bool = False) -> list[str]:
    """argv of `name` writing everything under folder d (`small`: fewer epochs/steps/cells, for CI)."""
    m, t = str(env["model"]), str(env["text"])
    calib = ["--calib-text", t, "--calib-seqlen", "32", "--calib-windows", "8", "--group-size", "32"]
    if name == "quantize-matgptq":
        return ["quantize", "--model", m, "--method", "matgptq", *calib, "--out", str(d / "out")]
    if name == "quantize-omniquant":
        return ["quantize", "--model", m, "--method", "omniquant", *calib, "--epochs", "1" if small else "3", "--scope", "ffn" if small else "ffn+attn",
                "--work-dir", str(d / "work"), "--out", str(d / "out")]
    if name == "quantize-qat":
        return ["quantize", "--model", m, "--method", "qat", *calib, "--steps", "6" if small else "12", "--save-every", "2",
                "--lr", "1e-3", "--train-device", "cpu", "--out", str(d / "out")]
    if name == "mixnmatch-budget":
        return ["mixnmatch", str(env["ckpt"]), "--budget", "5.0", "--reference", m, "--calib-text", t,
                "--calib-seqlen", "32", "--calib-windows", "4", "--generations", "1" if small else "3", "--offspring", "3",
                "--stage-windows", "1,2", "--survivors", "1", "--work-dir", str(d / "work"), "--out",
                str(d / "out.json"), "--no-progress"]
    if name == "experiment-grid":
        grid = d / "grid.yaml"
        if not grid.exists():
            d.mkdir(parents=True, exist_ok=True)
            grid.write_text(f"name: kill\nout: {d / 'out'}\nstore: {d / 'out' / 'results.jsonl'}\nmodels: [{m}]\n"
                            f"methods: [rtn]\nscopes: [ffn]\nslicing: [{'nested' if small else 'paper, nested'}]\n"
                            f"bits: [{'4' if small else '8, 4, 2'}]\n"
                            f"group_size: 32\neval:\n  ppl: {{text: {t}, windows: 2, seqlen: 64}}\n")
        return ["experiment", str(grid)]
    raise ValueError(name)


# ---------------------------------------------------------------- running and killing
def _child(argv: list[str], log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    # the parent's sys.stdout/stderr may be capture objects (pytest) that do not write to fds 1/2
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    import torch

    torch.set_num_threads(1)
    from matquant.cli import main

    try:
        rc = main(argv)
    except BaseException:
        import traceback

        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


_CTX = None
HANG_S = 600  # a run that takes longer is reported as hung (and killed)


def _context():
    """A forkserver: a single-threaded server process that imported matquant.cli once and forks every run (forking
    this process itself, after tokenizers/torch started threads, can deadlock a child on an inherited lock)."""
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "matquant.cli"])
    return _CTX


def run(argv: list[str], log: Path, kill_after: float | None = None) -> tuple[int | None, float, bool]:
    """(exit code or None if killed, seconds, killed); a run still going after HANG_S is killed, exit code -1."""
    p = _context().Process(target=_child, args=(argv, str(log)))
    t0 = time.time()
    p.start()
    p.join(HANG_S if kill_after is None else kill_after)
    killed = p.is_alive()
    if killed:
        os.kill(p.pid, signal.SIGKILL)
        p.join()
    if killed and kill_after is None:
        return -1, time.time() - t0, False
    return (None if killed else p.exitcode), time.time() - t0, killed


# ---------------------------------------------------------------- what the outputs are
def _safetensors_content(p: Path) -> dict:
    """Parsed header + hash of the tensor bytes. Not the file's hash: safetensors writes the __metadata__ entries
    in a per-process (hash map) order, so two identical runs can differ in those header bytes alone."""
    import struct

    b = p.read_bytes()
    n = struct.unpack("<Q", b[:8])[0]
    return {"header": json.loads(b[8:8 + n]), "data_sha256": hashlib.sha256(b[8 + n:]).hexdigest()[:16]}


def _store_results(store: Path) -> tuple[dict, int]:
    """({key: result without timings}, torn lines)."""
    out, torn = {}, 0
    if not store.exists():
        return out, torn
    for line in store.read_text().split("\n"):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            torn += 1
            continue
        res = {k: v for k, v in rec["result"].items() if not k.endswith("seconds") and k != "started"}
        out[rec["key"]] = res
    return out, torn


def outputs(name: str, d: Path) -> dict | None:
    """A comparable summary of what the command left at its output path (None: nothing there)."""
    if name.startswith("quantize"):
        out = d / "out"
        if not out.exists():
            return None
        files = sorted(p.name for p in out.iterdir())
        cfg = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else None
        st = out / "model.safetensors"
        # the run's own folder (e.g. in method_args.work_dir) is the one thing allowed to differ between runs
        qc = json.loads(json.dumps((cfg or {}).get("quantization_config")).replace(str(d), "<RUN>"))
        return {"files": files, "model.safetensors": _safetensors_content(st) if st.exists() else None, "quantization_config": qc}
    if name == "mixnmatch-budget":
        out = d / "out.json"
        if not out.exists():
            return None
        doc = json.loads(out.read_text())
        return {"bits_map": doc["bits_map"], "kl": doc["search"]["kl"], "total_bytes": doc["total_bytes"]}
    if name == "experiment-grid":
        res, torn = _store_results(d / "out" / "results.jsonl")
        return {"results": res, "torn": torn} if res or torn else None
    raise ValueError(name)


def check_after_kill(name: str, got: dict | None, ref: dict) -> str:
    """'' if what is visible after the kill is absent or complete, else what is wrong."""
    if got is None:
        return ""
    if name == "experiment-grid":
        if got["torn"] > 1:
            return f"{got['torn']} torn lines"
        bad = [k for k, v in got["results"].items() if ref["results"].get(k) != v]
        return f"{len(bad)} stored results differ from the reference" if bad else ""
    return "" if got == ref else "partial or different output visible at the output path"


def trial(name: str, env: dict, d: Path, delay: float, ref: dict, small: bool = False) -> dict:
    argv = command(name, env, d, small)
    rc, secs, killed = run(argv, d.parent / f"{d.name}.kill.log", delay)
    seen = outputs(name, d)
    visible_problem = check_after_kill(name, seen, ref)
    before = dict(seen["results"]) if name == "experiment-grid" and seen else {}
    rc2, secs2, _ = run(argv, d.parent / f"{d.name}.rerun.log")
    log = (d.parent / f"{d.name}.rerun.log").read_text(errors="replace")
    got = outputs(name, d)
    note = ""
    if rc2 != 0 and name.startswith("quantize") and "already exists" in log:
        note = "rerun refused: output already complete"
    identical = got is not None and (got == ref if name != "experiment-grid" else
                                     got["results"] == ref["results"])
    lost = [k for k in before if got is None or got["results"].get(k) != before[k]] if before else []
    return {"command": name, "delay_s": round(delay, 2), "killed": killed, "first_rc": rc, "rerun_rc": rc2,
            "rerun_error": log.strip().splitlines()[-1][-300:] if rc2 and log.strip() else "", "rerun_s": round(secs2, 1),
            "identical": identical, "visible_problem": visible_problem, "lost_results": len(lost), "note": note}


def reference(name: str, env: dict, base: Path, small: bool = False) -> tuple[dict, float]:
    """(outputs, seconds) of the uninterrupted run."""
    rc, t_ref, _ = run(command(name, env, base / "ref", small), base / "ref.log")
    if rc != 0:
        raise RuntimeError(f"{name}: the uninterrupted run failed (rc {rc}):\n" + (base / "ref.log").read_text()[-3000:])
    return outputs(name, base / "ref"), t_ref


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20, help="kills per command (default 20)")
    ap.add_argument("--commands", default=",".join(COMMANDS))
    ap.add_argument("--out", default=None,
                    help="folder of the runs (results in OUT/kill_anywhere.json; default: WORK/kill-anywhere)")
    add_work_option(ap, "the default --out")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    import matquant.cli  # noqa: F401  (imported once; every run is forked from here)

    root = Path(a.out) if a.out else work_path("kill-anywhere", work=a.work)
    env = setup(root / "fixtures")
    rng = random.Random(a.seed)
    rows, summary = [], {}
    for name in a.commands.split(","):
        base = root / name
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        ref, t_ref = reference(name, env, base)
        # timed once more (the first run of a command also pays one-off costs; the machine may be shared):
        # kill moments are drawn over the faster of the two
        t_ref = min(t_ref, run(command(name, env, base / "ref2"), base / "ref2.log")[1])
        for k in range(a.kills):
            r = trial(name, env, base / f"k{k:02d}", rng.uniform(0, 1.2 * t_ref), ref)
            r["ref_s"] = round(t_ref, 1)
            rows.append(r)
            print(json.dumps(r), flush=True)
        mine = [r for r in rows if r["command"] == name]
        summary[name] = {"kills": len(mine), "killed_mid_run": sum(r["killed"] for r in mine),
                         "uninterrupted_s": round(t_ref, 1),
                         "identical_after_rerun": sum(r["identical"] for r in mine),
                         "partial_output_visible": sum(bool(r["visible_problem"]) for r in mine),
                         "results_lost": sum(r["lost_results"] for r in mine),
                         "rerun_refused_complete": sum(bool(r["note"]) for r in mine)}
    report = {"summary": summary, "rows": rows, "torch_threads": 1, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                                         time.gmtime()),
              "load_avg": os.getloadavg()}
    (root / "kill_anywhere.json").write_text(json.dumps(report, indent=1))
    print("| command | kills | killed mid-run | identical after rerun | partial output visible | results lost | "
          "rerun refused (output complete) | uninterrupted run |")
    print("|---|---|---|---|---|---|---|---|")
    for n, s in summary.items():
        print(f"| `{n}` | {s['kills']} | {s['killed_mid_run']} | {s['identical_after_rerun']} | "
              f"{s['partial_output_visible']} | {s['results_lost']} | {s['rerun_refused_complete']} | "
              f"{s['uninterrupted_s']} s |")
    ok = all(s["identical_after_rerun"] == s["kills"] and not s["partial_output_visible"] and not s["results_lost"]
             for s in summary.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
