"""`matquant` command line. Each subcommand lives in matquant/commands/<name>.py and exposes
`register(subparsers)`; add new ones to COMMANDS (`export` also registers its old alias `slice`)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS = ("demo", "quantize", "eval", "info", "mixnmatch", "experiment", "report", "export", "generate")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="matquant",
        description="Matryoshka Quantization: build ONE int8 checkpoint whose top-bit slices are int6/4/3/2 models, "
                    "evaluate every precision, export any of them.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Run `matquant COMMAND --help` for the options of each command.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"matquant.commands.{name}").register(sub)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    debug = getattr(args, "debug", False) or os.environ.get("MATQUANT_DEBUG") == "1"

    def fail(msg, code: int) -> int:
        # one line, no traceback (MATQUANT_DEBUG=1 shows it); a TypeError is never caught: it is a bug in matquant
        print(f"matquant {args.command}: error: {' '.join(str(msg).split())}", file=sys.stderr)
        return code

    cuda = _cuda_unavailable(getattr(args, "device", None))
    if cuda:
        return fail(cuda, 2)
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except ImportError as e:
        if debug or (e.name or "").split(".")[0] in ("matquant", ""):
            raise  # our own import is broken: a bug, show it
        pkg = OPTIONAL_PACKAGES.get(e.name.split(".")[0], e.name.split(".")[0])
        return fail(f"this needs the optional package {pkg!r}, which is not installed: pip install {pkg}", 2)
    except FloatingPointError as e:  # a diverged run (NaN/Inf loss or logits): its message says what to try
        if debug:
            raise
        return fail(e, 2)
    except (ValueError, OSError) as e:  # bad input: the message names the problem and the fix
        if debug:
            raise
        return fail(e, 1)
    except (RuntimeError, AssertionError) as e:
        if debug or (isinstance(e, AssertionError) and "CUDA" not in str(e)):
            raise  # a failed assertion of our own is a bug
        hint = " (run with MATQUANT_DEBUG=1 for the traceback)"
        if "CUDA" in str(e) or "cuda" in str(e):
            return fail(f"{_first_line(e)}: no usable CUDA device; use --device cpu{hint}", 2)
        return fail(f"{_first_line(e)}; the run diverged or ran out of a resource{hint}", 2)


# import name -> pip package, for the one-line "missing optional dependency" message
OPTIONAL_PACKAGES = {"lm_eval": "lm-eval", "triton": "triton", "gguf": "gguf", "matplotlib": "matplotlib",
                     "compressed_tensors": "compressed-tensors", "yaml": "pyyaml"}


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"


def _cuda_unavailable(device) -> str | None:
    """The error line for a CUDA device on a torch without CUDA (or without a visible GPU), else None."""
    if not isinstance(device, str) or not device.startswith("cuda"):
        return None
    import torch

    if torch.cuda.is_available():
        return None
    why = ("this torch build has no CUDA support" if torch.version.cuda is None
           else "no CUDA GPU is visible")
    return f"--device {device} was asked for, but {why} (torch {torch.__version__}); use --device cpu."


if __name__ == "__main__":
    raise SystemExit(main())
