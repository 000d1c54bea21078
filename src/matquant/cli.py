"""`matquant` command line. Each subcommand lives in matquant/commands/<name>.py and exposes
`register(subparsers)`; add new ones to COMMANDS."""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = ("demo", "quantize", "eval", "slice", "info", "mixnmatch", "experiment", "report", "export", "generate")


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
    try:
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, FileExistsError, OSError, TypeError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"matquant {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
