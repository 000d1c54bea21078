"""Options and helpers shared by several subcommands."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from matquant.quant.slicing import SLICING_MODES


def _number_list(s: str, kind, example: str) -> list:
    try:
        vals = [kind(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {example}, got {s!r}") from None
    if not vals:
        raise argparse.ArgumentTypeError("expected at least one value")
    return vals


def byte_size(text: str) -> int:
    from matquant.mixnmatch.budget import parse_budget

    b = parse_budget(text)
    if b.kind != "bytes":
        raise argparse.ArgumentTypeError(f"{text!r} needs a unit, e.g. 2GB or 500MiB.")
    return int(b.value)


def int_list(s: str) -> list[int]:
    vals = _number_list(s, int, "integers like 8,4,2")
    bad = [v for v in vals if not 1 <= v <= 8]
    if bad:
        raise argparse.ArgumentTypeError(f"bits must be in 1..8, got {bad}")
    return vals


def float_list(s: str) -> list[float]:
    return _number_list(s, float, "numbers like 0.1,0.1,1")


def mode_list(s: str) -> list[str]:
    modes = [x.strip() for x in s.split(",") if x.strip()]
    bad = [m for m in modes if m not in SLICING_MODES]
    if bad or not modes:
        raise argparse.ArgumentTypeError(f"slicing modes must be among {', '.join(SLICING_MODES)}, got {s!r}")
    return modes


def add_slice_args(p: argparse.ArgumentParser, checkpoint_help: str = "matquant checkpoint folder") -> None:
    """The checkpoint and which slice of it: --bits R or --bits-map FILE (one required), --slicing."""
    p.add_argument("checkpoint", help=checkpoint_help)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--bits", type=int, help="precision, e.g. 4")
    g.add_argument("--bits-map", metavar="JSON", help="per-layer bits map (Mix'n'Match)")
    p.add_argument("--slicing", choices=SLICING_MODES, default=None, help="slicing mode (default: the checkpoint's)")


def add_eval_args(p: argparse.ArgumentParser, windows_default: int | None = 16) -> None:
    g = p.add_argument_group("perplexity evaluation")
    g.add_argument("--eval-text", default="eval", metavar="SRC",
                   help="'eval' (embedded BoolQ Wikipedia passages, never used for calibration) or a UTF-8 text file")
    g.add_argument("--seqlen", type=int, default=2048, help="window length in tokens (GPTQ protocol; default 2048)")
    g.add_argument("--windows", type=int, default=windows_default,
                   help="number of non-overlapping windows to score (default %(default)s; 0 = all)")
    g.add_argument("--batch-size", type=int, default=1, help="windows per forward pass")
    g.add_argument("--device", default="cpu", help="cpu or cuda")


def load_bits_map(path: str | None) -> dict | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"bits map {path} does not exist")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"bits map {path} is not valid JSON: {e}") from None
    if isinstance(d, dict) and "bits_map" in d:
        d = d["bits_map"]
    if not isinstance(d, dict) or not all(isinstance(v, int) for v in d.values()):
        raise ValueError(f"bits map {path} must be a JSON object {{module name or pattern: bits}}")
    return d


def eval_windows(tokenizer, args):
    from matquant.data import token_windows

    return token_windows(tokenizer, args.eval_text, args.seqlen, args.windows or None)
