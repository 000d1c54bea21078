"""Zero-shot accuracy through lm-evaluation-harness on the in-memory model (tasks and their local data:
eval/zeroshot_tasks.py).

The in-memory model, quantized or not, is wrapped with ``HFLM(pretrained=model, tokenizer=tok)``, so every precision
of one loaded checkpoint is scored by switching ``set_bits`` between runs.

Which metric enters the average (lm-eval / paper convention, see docs/evaluation.md):
``acc_norm`` (length-normalised log-likelihood) for ARC-Challenge, ARC-Easy, HellaSwag and PIQA; ``acc`` for
BoolQ and WinoGrande (single-word answers / identical continuations, where normalisation is meaningless).
Both acc and acc_norm are reported for every task.

Cost: the full validation sets are 17,286 questions (≈ 56k scored continuations). On a 2-core CPU this is far
too slow per slice (docs/benchmarks.md), so the CPU default is a fixed subset: the first ``CPU_DEFAULT_LIMIT``
questions of each task (lm-eval's ``limit``, file order). On a GPU the default is the full sets.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from matquant.eval.grid import slice_jobs
from matquant.eval.zeroshot_tasks import (DEFAULT_TASKS, TASKS, _require_lm_eval, _task_manager, build_tasks,
                                          check_tasks)
from matquant.nn.bits import effective_bits, get_bits, set_bits

CPU_DEFAULT_LIMIT = 100  # questions per task on CPU (the first N in file order); None (full sets) on GPU


def default_limit(device: str) -> int | None:
    """The documented default subset: CPU_DEFAULT_LIMIT questions per task on CPU, the full sets elsewhere."""
    return CPU_DEFAULT_LIMIT if str(device).startswith("cpu") else None


# ----------------------------------------------------------------------------------------------- tokenizer checks
def tokenizer_fingerprint(tok) -> str:
    """A short hash of the vocabulary and special tokens: equal fingerprints = same tokenization."""
    vocab = tok.get_vocab()
    payload = json.dumps([sorted(vocab.items()), str(tok.bos_token), str(tok.eos_token), str(tok.unk_token)],
                         ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def check_tokenizer(model, tok, expected_fingerprint: str | None = None, where: str = "the checkpoint") -> None:
    """The tokenizer must fit the model's embedding and, if given, match the tokenizer evaluation expects."""
    if tok is None:
        raise ValueError(f"{where} has no tokenizer files; re-create it with `matquant quantize`.")
    n_emb = model.get_input_embeddings().weight.shape[0]
    if len(tok) > n_emb:
        raise ValueError(f"the tokenizer of {where} has {len(tok)} tokens but the model's embedding has only "
                         f"{n_emb} rows: the tokenizer belongs to a different model. Save the checkpoint again "
                         "with the source model's tokenizer.")
    if expected_fingerprint is not None:
        fp = tokenizer_fingerprint(tok)
        if fp != expected_fingerprint:
            raise ValueError(f"the tokenizer of {where} (fingerprint {fp}) differs from the one evaluation expects "
                             f"({expected_fingerprint}, the source model's): scores would not be comparable. "
                             "Re-create the checkpoint from that model, or evaluate it in its own grid.")


# ----------------------------------------------------------------------------------------------- evaluation
@dataclass
class ZeroShotResult:
    tasks: dict[str, dict]  # task -> {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "n", "metric", "score"}
    limit: int | None
    seconds: float
    average: float = field(init=False)

    def __post_init__(self):
        self.average = sum(r["score"] for r in self.tasks.values()) / max(len(self.tasks), 1)

    def rows(self, **extra) -> list[dict]:
        """Tidy rows: one per task plus an "average" row (pandas: pd.DataFrame(result.rows()))."""
        out = [dict(extra, task=t, **r) for t, r in self.tasks.items()]
        out.append(dict(extra, task="average", metric="mixed", score=self.average,
                        n=sum(r["n"] for r in self.tasks.values())))
        return out

    def to_dict(self) -> dict:
        return {"tasks": self.tasks, "average": self.average, "limit": self.limit, "seconds": self.seconds}


def wrap_model(model, tok, batch_size: int = 16):
    """lm-eval's HFLM around an in-memory model (quantized layers included); no weights are reloaded."""
    _require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    return HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=device)


def zeroshot(model, tok, tasks=DEFAULT_TASKS, limit: int | None | str = "default", batch_size: int = 16,
             lm=None, task_objs: dict | None = None, expected_tokenizer: str | None = None,
             progress: bool = True) -> ZeroShotResult:
    """Zero-shot acc / acc_norm on `tasks` for the model AS IT IS NOW (current bits / slicing).

    `limit`: questions per task (the first N, file order); "default" = CPU_DEFAULT_LIMIT on CPU, all on GPU;
    None = full validation sets. `lm` / `task_objs` can be passed to reuse them across slices.
    """
    tasks = check_tasks(tasks)
    check_tokenizer(model, tok, expected_tokenizer)
    if limit == "default":
        limit = default_limit(str(next(model.parameters()).device))
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer (questions per task) or None (full sets), got {limit!r}")
    task_objs = task_objs or build_tasks(tasks)
    lm = lm or wrap_model(model, tok, batch_size)
    from lm_eval.evaluator import simple_evaluate

    t0 = time.time()
    was_training = model.training
    model.eval()
    res = simple_evaluate(model=lm, tasks=[task_objs[t] for t in tasks], limit=limit, log_samples=False,
                          bootstrap_iters=1000, task_manager=_task_manager())
    model.train(was_training)
    secs = time.time() - t0
    out = {}
    for t in tasks:
        r = res["results"][t]
        n = int(res.get("n-samples", {}).get(t, {}).get("effective", 0)) or None
        row = {"acc": r.get("acc,none"), "acc_stderr": _num(r.get("acc_stderr,none")),
               "acc_norm": r.get("acc_norm,none"), "acc_norm_stderr": _num(r.get("acc_norm_stderr,none")),
               "n": n, "metric": TASKS[t][1]}
        row["score"] = row[TASKS[t][1]]
        out[t] = row
    return ZeroShotResult(tasks=out, limit=limit, seconds=round(secs, 2))


def _num(x):
    return x if isinstance(x, (int, float)) else None


def zeroshot_grid(model, tok, bits_list, modes, tasks=DEFAULT_TASKS, limit="default",
                  batch_size: int = 16, bits_map=None, progress: bool = True) -> list[dict]:
    """Tidy rows (one per bits × slicing × task, plus "average" rows), switching precision in place with set_bits.

    Like ppl_grid, the master precision is identical in every slicing mode and is evaluated once (slicing "any").
    """
    tasks = check_tasks(tasks)
    task_objs = build_tasks(tasks)
    lm = wrap_model(model, tok, batch_size)
    saved = get_bits(model)
    master, jobs = slice_jobs(model, bits_list, modes, bits_map)
    rows = []
    try:
        for b, mode in tqdm(jobs, desc="zero-shot slices", disable=not progress):
            set_bits(model, bits_map if b == "map" else b, mode)
            r = zeroshot(model, tok, tasks, limit, batch_size, lm=lm, task_objs=task_objs, progress=progress)
            rows += r.rows(bits=b, slicing=mode if b != master else "any",
                           effective_bits=round(effective_bits(model), 4), seconds=r.seconds, limit=r.limit)
    finally:
        set_bits(model, saved)
    return rows


def format_zeroshot_table(rows: list[dict], title: str | None = None) -> str:
    """Markdown: one line per (method, bits, slicing); per-task score (acc_norm or acc, marked) and the average."""
    groups: dict = {}  # insertion-ordered
    for r in rows:
        groups.setdefault((r.get("method", ""), r.get("bits"), r.get("slicing", "")), {})[r["task"]] = r
    tasks = [t for t in TASKS if any(t in g for g in groups.values())]
    head = "| method | bits | slicing | " + " | ".join(f"{t} ({TASKS[t][1]})" for t in tasks) + " | avg |"
    lines = ([f"**{title}**", ""] if title else []) + [head, "|" + "---|" * (len(tasks) + 4)]
    for (method, bits, slicing), g in groups.items():
        cells = [f"{100 * g[t]['score']:.1f}" if t in g and g[t]["score"] is not None else "—" for t in tasks]
        avg = g.get("average", {}).get("score")
        avg_cell = f"{100 * avg:.1f}" if avg is not None else "—"
        lines.append(f"| {method} | {bits} | {slicing} | " + " | ".join(cells) + f" | {avg_cell} |")
    return "\n".join(lines)
