"""Run an experiment grid: quantize each job once, evaluate every missing measurement, append each result to the
store the moment it is measured (so an interrupt loses at most the measurement in flight), then regenerate the
report (markdown tables + PNG plots)."""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch

from matquant.algorithms import Calibration, make_config
from matquant.algorithms.pipeline import quantize
from matquant.experiments.grid import Grid, QuantJob
from matquant.experiments.store import ResultStore, config_key, host_info, utc_now
from matquant.format.checkpoint import load_checkpoint
from matquant.models import load_model
from matquant.models.targets import layer_index
from matquant.nn.bits import effective_bits, matquant_modules, set_bits


class Evaluators:
    """The evaluation functions the runner calls (replaceable in tests)."""

    def ppl(self, model, tok, settings: dict) -> dict:
        from matquant.data import token_windows
        from matquant.eval.perplexity import perplexity

        windows = token_windows(tok, settings["text"], settings["seqlen"], settings["windows"] or None)
        return perplexity(model, windows, settings.get("batch_size", 1), desc="ppl").to_dict()

    def zeroshot(self, model, tok, settings: dict, cache: dict) -> dict:
        from matquant.eval.zeroshot import wrap_model, zeroshot
        from matquant.eval.zeroshot_tasks import build_tasks

        if "lm" not in cache:  # one HFLM wrapper + task set per loaded model, reused across precisions
            cache["lm"] = wrap_model(model, tok, settings.get("batch_size", 8))
            cache["tasks"] = build_tasks(settings["tasks"])
        r = zeroshot(model, tok, settings["tasks"], settings["limit"], lm=cache["lm"], task_objs=cache["tasks"])
        return r.to_dict()


def run_grid(grid: Grid, evaluators: Evaluators | None = None, log: Callable[[str], None] = print,
             report: bool = True) -> dict:
    """Run every missing measurement of `grid`; returns {"done", "skipped", "measured", "seconds"}."""
    from matquant.eval.zeroshot import check_tokenizer, tokenizer_fingerprint

    ev = evaluators or Evaluators()
    store = ResultStore(grid.store)
    if grid.threads:
        torch.set_num_threads(int(grid.threads))
    done = store.keys()
    total = sum(len(j.evals) for j in grid.jobs)
    todo_jobs = [j for j in grid.jobs if any(config_key(c) not in done for c in j.evals)]
    n_todo = sum(1 for j in todo_jobs for c in j.evals if config_key(c) not in done)
    log(f"grid {grid.name}: {total} measurements, {total - n_todo} already in {grid.store}, {n_todo} to run")
    t_start = time.time()
    measured = 0
    models: dict[str, tuple] = {}
    try:
        for job in todo_jobs:
            if job.model not in models:
                models.clear()  # keep one source model in memory at a time
                log(f"loading {job.model} ...")
                m, tok, _ = load_model(job.model, device=grid.device)
                models[job.model] = (m, tok, tokenizer_fingerprint(tok))
            src, src_tok, src_fp = models[job.model]
            model, tok, qinfo = _prepare(job, src, src_tok, src_fp, grid, log, check_tokenizer)
            cache: dict = {}
            for cfg in job.evals:
                if config_key(cfg) in done:
                    continue
                eff = _apply_bits(model, cfg["bits"], job.quant)
                started, t0 = utc_now(), time.time()
                settings = dict(grid.ppl if cfg["eval"] == "ppl" else grid.zeroshot)
                res = ev.ppl(model, tok, settings) if cfg["eval"] == "ppl" else ev.zeroshot(model, tok, settings,
                                                                                             cache)
                secs = round(time.time() - t0, 2)
                res = {**res, "effective_bits": eff, **qinfo}
                store.append(cfg, res, seconds=secs, started=started,
                             host={**host_info(), "batch_size": settings.get("batch_size")})
                done.add(config_key(cfg))
                measured += 1
                log(f"  [{total - n_todo + measured}/{total}] {_describe(cfg)}: {_headline(cfg, res)} ({secs:.0f}s)")
            del model
    except KeyboardInterrupt:
        log(f"interrupted: {measured} new result(s) were stored in {grid.store}; run the same command again to "
            "resume (finished measurements are skipped).")
        raise
    finally:
        if report and measured:
            from matquant.experiments.report import write_report

            write_report(store, grid.out, name=grid.name, docs=grid.docs)
    return {"total": total, "skipped": total - n_todo, "measured": measured,
            "seconds": round(time.time() - t_start, 1)}


def _prepare(job: QuantJob, src, src_tok, src_fp, grid: Grid, log, check_tokenizer):
    """(model, tokenizer, info) ready for evaluation: the fp32 source, a fresh quantization, or a checkpoint."""
    if job.quant is None:
        return src, src_tok, {}
    if "checkpoint" in job.quant:
        model, tok, qcfg = load_checkpoint(job.quant["checkpoint"], slicing=job.quant["slicing"],
                                           device=grid.device)
        check_tokenizer(model, tok, expected_fingerprint=src_fp,
                        where=f"checkpoint {job.quant['checkpoint']} (grid model {job.model})")
        return model, tok, {"checkpoint_method": qcfg.method}
    q = job.quant
    log(f"quantizing {job.model}: {q['label']} ({q['method']}, {q['scope']}, {q['slicing']} slicing) ...")
    config = make_config(q["method"], master_bits=q["master_bits"], group_size=q["group_size"], scope=q["scope"],
                         symmetric=q["symmetric"], slicing=q["slicing"], param_dtype=q["param_dtype"], **q["args"])
    c = q.get("calib") or {}
    calib = Calibration(text=c.get("text", "calib"), windows=c.get("windows"), seqlen=c.get("seqlen"),
                        offset=c.get("offset", 0))
    t0 = time.time()
    model, _, _ = quantize(copy.deepcopy(src), config, tokenizer=src_tok, calib=calib, log=log)
    model.eval()
    return model, src_tok, {"quantize_seconds": round(time.time() - t0, 2)}


def _apply_bits(model, bits, quant) -> float:
    if quant is None:
        return 32.0
    # a dict is a Mix'n'Match schedule
    set_bits(model, schedule_bits_map(model, bits) if isinstance(bits, dict) else int(bits), quant["slicing"])
    return round(effective_bits(model), 4)


def schedule_bits_map(model, spec: dict) -> dict[str, int]:
    """{module: bits} of the Mix'n'Match schedule `spec` (a grid's mixnmatch entry) for `model`'s quantized layers."""
    from matquant.mixnmatch import bits_map_for_schedule

    mods = matquant_modules(model)
    blocks: dict[int, list[str]] = {}
    for n in mods:
        blocks.setdefault(layer_index(n) or 0, []).append(n)
    numels = {n: m.qweight.numel() for n, m in mods.items()}
    return bits_map_for_schedule(blocks, spec["target"], spec["schedule"], spec["ladder"], numels,
                                 spec.get("floor", "auto"))


def _describe(cfg: dict) -> str:
    q = cfg["quant"]
    b = cfg["bits"]
    bits = f"int{b}" if not isinstance(b, dict) else f"M&M {b['schedule']}@{b['target']}"
    if q is None:
        return f"{cfg['model']} fp32 {cfg['eval']}"
    return f"{cfg['model']} {q['label']} {q.get('scope', '')} {q['slicing']} {bits} {cfg['eval']}"


def _headline(cfg: dict, res: dict) -> str:
    if cfg["eval"] == "ppl":
        return f"ppl {res['ppl']:.3f}"
    return f"task avg {100 * res['average']:.1f}"


def store_path_for(path) -> Path:
    """A store argument may be the .jsonl itself or the grid's output folder."""
    p = Path(path)
    return p / "results.jsonl" if p.is_dir() else p
