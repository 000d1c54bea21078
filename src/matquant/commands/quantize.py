"""matquant quantize: build one multi-precision checkpoint from a full-precision model. Its flags are generated
from the method configs (algorithms/configs/); `--method NAME --help` shows that method's options."""
from __future__ import annotations

import argparse
import dataclasses
import sys

from matquant.commands.common import float_list, int_list
from matquant.models.loading import DEFAULT_MODEL

PARSERS = {"int_list": int_list, "float_list": float_list}


def _add_field(group, f: dataclasses.Field, suppress: bool = True) -> None:
    """One CLI flag for config field `f` (default SUPPRESS: an absent flag leaves the config's default)."""
    m = f.metadata
    from matquant.algorithms.configs.base import dest_of, flag_of

    kw = {"dest": dest_of(f), "help": m["help"] + ("" if m.get("action") or f.default is None
                                               else f" (default {f.default})")}
    kw["default"] = argparse.SUPPRESS if suppress else f.default
    if m.get("action"):
        kw["action"] = m["action"]
    else:
        t = m.get("type")
        kw["type"] = PARSERS.get(t, t) if t else (int if isinstance(f.default, int) else float
                                                  if isinstance(f.default, float) else None)
        if m.get("choices"):
            kw["choices"] = m["choices"]
        if m.get("metavar"):
            kw["metavar"] = m["metavar"]
    group.add_argument(flag_of(f), **kw)


def _add_common(p, threads_default: int | None, default_text: str) -> None:
    from matquant.algorithms import METHOD_CONFIGS, MethodConfig
    from matquant.algorithms.configs.base import LAYOUT
    from matquant.algorithms.recipes import RECIPES

    g = p.add_argument_group("quantization (every method)")
    g.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                   help="a measured preset of a method's options, filling in those not given: "
                        + "; ".join(f"{k} = {recipe_text(k)}" for k in RECIPES)
                        + f" (docs/results.md 'Recipes'). Default: {default_text}")
    g.add_argument("--method", default=None, choices=sorted(METHOD_CONFIGS),
                   help="; ".join(f"{n}: {c.summary}" for n, c in sorted(METHOD_CONFIGS.items()))
                        + ". A method named alone runs with its own defaults; `--method NAME --help` lists its "
                          "options (docs/methods.md)")
    for f in MethodConfig.option_fields((LAYOUT,)):
        _add_field(g, f)
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


def add_quant_args(p, threads_default: int | None = None, default_text: str = "quality") -> None:
    """The quantization flags of every method (parsing), with a --help that shows the chosen method's only."""
    from matquant.algorithms import METHOD_CONFIGS, MethodConfig
    from matquant.algorithms.configs.base import LAYOUT, flag_of

    _add_common(p, threads_default, default_text)
    common = {f.name for f in MethodConfig.option_fields((LAYOUT,))}
    g = p.add_argument_group("method options (`--method NAME --help` shows one method's)")
    seen = set()
    for cls in METHOD_CONFIGS.values():
        for f in cls.option_fields():
            if f.name not in common and flag_of(f) not in seen and f.metadata.get("cli", True):
                seen.add(flag_of(f))
                _add_field(g, f)
    p.set_defaults(_threads_default=threads_default, _default_text=default_text)


def method_help_parser(parser, method: str, threads_default, default_text: str):
    """A parser for display only: `parser`'s own arguments (--model, --out, ...), the common flags and `method`'s."""
    from matquant.algorithms import METHOD_CONFIGS, MethodConfig, config_class
    from matquant.algorithms.configs.base import LAYOUT

    from matquant.algorithms.configs.base import dest_of

    quant = {dest_of(f) for c in METHOD_CONFIGS.values() for f in c.option_fields()} | {
        "recipe", "method", "calib_text", "calib_windows", "calib_seqlen", "threads", "help"}
    hp = argparse.ArgumentParser(prog=parser.prog, description=parser.description, add_help=False)
    hp.add_argument("-h", "--help", action="help", help="show this help message and exit")
    for action in parser._actions:
        if action.dest not in quant and not action.dest.startswith("_"):
            hp._add_action(action)
    _add_common(hp, threads_default, default_text)
    cls = config_class(method)
    common = {f.name for f in MethodConfig.option_fields((LAYOUT,))}
    g = hp.add_argument_group(f"{method} options ({cls.summary})")
    for f in cls.option_fields():
        if f.name not in common and f.metadata.get("cli", True):
            _add_field(g, f, suppress=False)
    return hp


class MethodHelp(argparse.Action):
    """--help: the common options and those of the method named by --method (or by --recipe, or the default)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from matquant.algorithms.recipes import DEFAULT_RECIPE, RECIPES

        argv = sys.argv[1:]
        method = _flag_value(argv, "--method") or getattr(namespace, "method", None)
        recipe = _flag_value(argv, "--recipe") or getattr(namespace, "recipe", None) or DEFAULT_RECIPE
        if method is None:
            method = RECIPES.get(recipe, {}).get("method", "matgptq")
        try:
            hp = method_help_parser(parser, method, parser.get_default("_threads_default"),
                                    parser.get_default("_default_text"))
        except ValueError as e:
            parser.error(str(e))
        hp.print_help()
        print(f"\nother methods: {', '.join(m for m in _methods() if m != method)} "
              f"(`{parser.prog} --method NAME --help`)")
        parser.exit()


def _methods():
    from matquant.algorithms import METHOD_CONFIGS

    return sorted(METHOD_CONFIGS)


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def recipe_text(name: str) -> str:
    from matquant.algorithms.recipes import RECIPES

    return " ".join(f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                    for k, v in RECIPES[name].items())


def config_from_args(args):
    """(the validated method config, the Calibration) the flags describe. A flag of another method is an error
    naming the methods that take it."""
    from matquant.algorithms import METHOD_CONFIGS, Calibration, config_class
    from matquant.algorithms.configs.base import dest_of
    from matquant.algorithms.recipes import DEFAULT_RECIPE, RECIPES, resolve_config

    if getattr(args, "_config", None) is not None:
        return args._config, args._calibration
    def cli_fields(cls):
        return [f for f in cls.option_fields() if f.metadata.get("cli", True)]

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
    description = ("Quantize the target linear layers of a model to C-bit master codes and write ONE checkpoint "
                   "folder from which every precision <= C can be loaded. Default: --recipe quality.")
    p = sub.add_parser("quantize", help="quantize a model into one multi-precision checkpoint folder",
                       description=description, add_help=False)
    p.add_argument("-h", "--help", action=MethodHelp, help="show the options (of --method NAME if given) and exit")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="HF hub id, local HF folder, .gguf file, or the embedded 'smollm2-135m' (default)")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    add_quant_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from matquant.algorithms.pipeline import quantize

    config, calibration = config_from_args(args)  # every option checked before any work
    quantize(args.model, config, out=args.out, overwrite=args.overwrite, calib=calibration, threads=args.threads)
    return 0
