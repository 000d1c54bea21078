"""matquant quantize: build one multi-precision checkpoint from a full-precision model."""
from __future__ import annotations

import time
from functools import lru_cache

from matquant.commands.common import float_list, int_list
from matquant.models.loading import DEFAULT_MODEL
from matquant.models.targets import SCOPES
from matquant.algorithms.recipes import RECIPE_OPTIONS, RECIPES, apply_recipe
from matquant.algorithms.slice_params import SLICE_PARAMS
from matquant.quant.clip_search import CLIP_MODES, check_clip_lambdas
from matquant.quant.rotation import ROTATE_MODES
from matquant.quant.slicing import DEFAULT_SLICING, SLICING_MODES


def add_quant_args(p, method_default: str = "matgptq", threads_default: int | None = None) -> None:
    from matquant.algorithms import METHODS
    from matquant.algorithms.matgptq import DEFAULT_ERROR_FEEDBACK, DEFAULT_GROUP_PARAMS, ERROR_FEEDBACK, GROUP_PARAMS

    g = p.add_argument_group("quantization")
    g.add_argument("--recipe", default=None, choices=sorted(RECIPES),
                   help="a measured combination of the options below, filling in those not given: "
                        + "; ".join(f"{k} = {recipe_text(k)}" for k in RECIPES)
                        + " (docs/results.md 'Recipes': what each costs and gives). Default: none (the options' own "
                          "defaults, = fast)")
    g.add_argument("--method", default=None, choices=sorted(METHODS),
                   help="rtn: round-to-nearest MinMax (no data); gptq: GPTQ at --bits-master bits (the per-bit "
                        "baseline); matgptq: multi-precision GPTQ whose int-C codes are chosen for every slice in "
                        f"--bits-list. See docs/methods.md (default {method_default})")
    p.set_defaults(_method_default=method_default)
    g.add_argument("--bits-master", type=int, default=8, metavar="C",
                   help="bits of the stored master codes; every precision <= C is sliced from them (default 8)")
    g.add_argument("--scope", default="ffn", choices=SCOPES, help="which linear layers to quantize (default ffn)")
    g.add_argument("--modules", default=None, metavar="REGEX",
                   help="quantize exactly the linear layers whose full name matches REGEX (any architecture)")
    g.add_argument("--group-size", type=int, default=64,
                   help="input weights per (scale, zero) group; -1 = per output channel (default 64)")
    g.add_argument("--symmetric", action="store_true", help="symmetric quantizer (zero-point fixed at 2^(C-1))")
    g.add_argument("--slicing", default=DEFAULT_SLICING, choices=SLICING_MODES,
                   help="how an r-bit slice is read from the C-bit codes: paper (round-half-up + clamp, the "
                        "paper's), nested (truncate + bucket centre: an exact bit prefix; measured better at 2-4 "
                        "bits), extra (no clamp, 2^r+1 levels). Data-driven methods optimise the codes for this mode; "
                        "it is stored as the checkpoint's default and can be changed at eval time "
                        "(default %(default)s)")
    g.add_argument("--param-dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                   help="storage dtype of scales and zeros (default float16)")
    g.add_argument("--rotate", default=None, choices=ROTATE_MODES,
                   help="incoherence processing for every method: input = randomized Hadamard over each layer's "
                        "input dimension, block = one per group; W·V is quantized and each layer rotates its input "
                        "online (stored in the checkpoint; GGUF/compressed-tensors export refuse it); residual = one "
                        "over the residual stream, folded into the weights (Llama/Mistral/Qwen2/3: nothing online, "
                        "exportable). See docs/rotation.md (default none)")
    g.add_argument("--rotate-seed", type=int, default=0, help="seed of the rotation's random signs (default 0)")
    g.add_argument("--clip", default=None, choices=CLIP_MODES,
                   help="group scale/zero of the master, every method: minmax (the MinMax range; the default), mse "
                        "(per-group search of the clipping range minimising the multi-slice error of the served "
                        "slices, data-free), weighted (the same weighted by the calibration inputs' mean x^2 / the "
                        "GPTQ Hessian diagonal; rtn then loads --calib-text). omniquant/qat: the learnable clipping's "
                        "start (qat needs --qparams learnable). See docs/results.md 'Clipping search'")
    g.add_argument("--slice-params", default=None, choices=SLICE_PARAMS,
                   help="group scale/zero of the slices, every method: the master's, shared by every slice (the "
                        "paper's; default), or each served precision's own (the master and 6,4,3,2 below an int8 "
                        "master), fitted by least squares to that precision's calibration output error for its "
                        "unchanged codes (gptq/matgptq: inside their pass; rtn/omniquant/qat: one more block-wise "
                        "pass after the method; rtn then loads --calib-text). A served slice costs the same bits "
                        "either way; the checkpoint holds one more pair per group and slice (docs/results.md, "
                        "'Slice-own group parameters'; default: the --recipe's, else shared)")
    g.add_argument("--calib-text", default="calib", metavar="SRC",
                   help="calibration text for data-driven methods: 'calib' (embedded, disjoint from eval) or a file")
    g.add_argument("--calib-windows", type=int, default=None,
                   help="calibration windows (default: the method's; 32 for gptq/matgptq/qat (CPU-friendly; GPTQ "
                        "papers use 128), 8 for omniquant)")
    g.add_argument("--calib-seqlen", type=int, default=None,
                   help="calibration window length in tokens (default: the method's; 512, omniquant 256; "
                        "papers use 2048)")
    g = p.add_argument_group("multi-precision objective (matgptq, qat, omniquant)")
    g.add_argument("--bits-list", type=int_list, default=None, metavar="R",
                   help="precisions optimised jointly (default: qat/omniquant 8,4,2 as in the paper; matgptq "
                        "8,4,3,2, measured best one-shot); '2' with --bits-master 8 is Single-Precision MatQuant; "
                        "R = {C} with --bits-master C is a dedicated baseline")
    g.add_argument("--lambdas", type=float_list, default=None, metavar="L",
                   help="weight of each --bits-list precision, same order. Defaults: qat/omniquant 0.1,0.1,1 for "
                        "8,4,2 (the paper's), else 1 for the lowest and 0.1 for the others; matgptq 16,4,2,1 for "
                        "8,4,3,2 and 16,4,1 for 8,4,2 (measured; 0.1,0.1,1 ruins int8 in one-shot), else all 1")
    g.add_argument("--distill", default=None, metavar="SPEC",
                   help="qat: co-distillation in the paper's notation: '[8,4,2]' (none), '[8,4,8->2]' (int2 learns "
                        "only from the int8 slice), '[8,4,2,8->2]' (int2: ground truth + int8 teacher), '[8,4,2,8->4;2]'")
    g = p.add_argument_group("gptq / matgptq")
    g.add_argument("--damp", type=float, default=0.01,
                   help="Hessian damping, as a fraction of its mean diagonal (default 0.01)")
    g.add_argument("--act-order", action="store_true",
                   help="process columns by decreasing Hessian diagonal (group parameters then fixed up front)")
    g.add_argument("--error-feedback", default=DEFAULT_ERROR_FEEDBACK, choices=ERROR_FEEDBACK,
                   help="matgptq: residual propagated to later columns: the lambda-weighted mean over the slices "
                        "(weighted), their plain mean (mean), or the int-C residual only (master) (default %(default)s)")
    g.add_argument("--group-params", default=DEFAULT_GROUP_PARAMS, choices=GROUP_PARAMS,
                   help="matgptq: group scale/zero: MinMax at C bits, or a per-row search of the range that "
                        "minimises the lambda-weighted multi-slice error (default %(default)s)")
    g.add_argument("--clip-lambdas", type=float_list, default=None, metavar="L",
                   help="with --clip weighted/mse: the slice weights of the clipping search only. matgptq, "
                        "omniquant, qat: one per --bits-list precision (default: --lambdas; omniquant/qat: the "
                        "search is the start of the learnable clipping); a large int8 weight keeps the search from "
                        "clipping the outlier weights the master needs (docs/results.md, 'Recipes'). gptq: one per "
                        "served slice, the master and 6,4,3,2 below it (e.g. 1,0,0 at --bits-master 4: the search "
                        "for int4 alone)")
    g.add_argument("--refit", action="store_true", default=None,
                   help="after the column loop, re-solve every group's scale/zero for its final codes by least squares "
                        "on the calibration output error of every served slice (docs/results.md, 'Refit')")
    g.add_argument("--propagate", default="master", metavar="master|fp|BITS",
                   help="matgptq: what later layers see during the pass: the int-C master weights (default), the "
                        "full-precision weights (fp), or one slice (e.g. 4)")
    g.add_argument("--calib-batch-size", type=int, default=1, help="calibration windows per block forward")
    g.add_argument("--threads", type=int, default=threads_default, metavar="N",
                   help="torch CPU threads. Results are deterministic for a given thread count but not across "
                        "thread counts (BLAS reduction order flips a few GPTQ codes, which then propagate; "
                        "docs/benchmarks.md) (default: " + (str(threads_default) if threads_default else
                                                             "torch's, the number of physical cores") + ")")
    g.add_argument("--quant-device", default=None, metavar="DEV",
                   help="device for the block-by-block pass (default: cuda if available, else cpu); one block at "
                        "a time is moved there")
    add_qat_args(p)
    add_omniquant_args(p)


def recipe_text(name: str) -> str:
    return " ".join(f"--{k.replace('_', '-')} {','.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                    for k, v in RECIPES[name].items())


def resolve_recipe(args):
    """Fill the options a --recipe sets (unless given on the command line), then the plain defaults; idempotent.
    Every command taking add_quant_args calls it before reading args.method / args.rotate."""
    if getattr(args, "_recipe_resolved", False):
        return args
    given = {k: getattr(args, k, None) for k in RECIPE_OPTIONS}
    filled = apply_recipe(args.recipe, given)
    for k, v in filled.items():
        setattr(args, k, v)
    args._from_recipe = {k for k, v in filled.items() if given[k] is None and v is not None}  # for error messages
    if args.method is None:
        args.method = args._method_default
    if args.rotate is None:
        args.rotate = "none"
    args._recipe_resolved = True
    return args


# The methods that read each method-specific flag (argparse dest -> methods). Given with any other method, the
# flag would be silently ignored, so it is an error instead (a value equal to the flag's default counts as not given).
FLAG_METHODS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("damp", "act_order", "calib_batch_size", "quant_device", "refit"), ("gptq", "matgptq")),
    **dict.fromkeys(("error_feedback", "group_params", "propagate"), ("matgptq",)),
    "clip_lambdas": ("gptq", "matgptq", "omniquant", "qat"),
    **dict.fromkeys(("bits_list", "lambdas"), ("matgptq", "qat", "omniquant")),
    **dict.fromkeys(("distill", "lr", "seed", "work_dir", "weight_decay"), ("qat", "omniquant")),
    **dict.fromkeys(("steps", "warmup_steps", "min_lr_ratio", "batch_size_train", "grad_accum", "max_grad_norm",
                     "qparams", "keep_work_dir", "save_every", "train_device", "amp"), ("qat",)),
    **dict.fromkeys(("epochs", "lr_lwc", "lr_let", "let", "loss_balance", "block_inputs"), ("omniquant",)),
}
FLAG_WHAT = {"refit": "re-solves GPTQ's group scale/zero for its codes"}


@lru_cache(maxsize=1)
def _flag_defaults() -> dict:
    import argparse

    p = argparse.ArgumentParser()
    add_quant_args(p)
    return {dest: p.get_default(dest) for dest in FLAG_METHODS}


def _flag_name(dest: str) -> str:
    return "--no-amp" if dest == "amp" else "--" + dest.replace("_", "-")


def check_method_flags(args) -> None:
    """One clear error for a method-specific flag given with a method that does not read it."""
    defaults = _flag_defaults()
    for dest, methods in FLAG_METHODS.items():
        if getattr(args, dest, defaults[dest]) == defaults[dest] or args.method in methods:
            continue
        flag = _flag_name(dest)
        what = f" {FLAG_WHAT[dest]}: it" if dest in FLAG_WHAT else ""
        raise ValueError(f"{flag}{what} applies to --method {' or '.join(methods)}, not {args.method}; drop {flag} "
                         "or pick one of those methods (`matquant quantize --help` groups the options by method).")


def method_kwargs(args) -> dict:
    """The options of the chosen method (recorded in the checkpoint's quantization_config.method_args),
    validated before any work starts."""
    check_method_flags(args)
    own = {} if getattr(args, "slice_params", None) in (None, "shared") else {"slice_params": args.slice_params}
    if args.method == "qat":
        return {**qat_kwargs(args), **own}
    if args.method == "omniquant":
        return {**omniquant_kwargs(args), **own}
    if args.method not in ("gptq", "matgptq"):
        return own  # rtn
    kw = dict(damp=args.damp, act_order=args.act_order, batch_size=args.calib_batch_size, **own)  # own: recorded only when used
    if args.quant_device:
        kw["device"] = args.quant_device
    if getattr(args, "refit", None):
        kw["refit"] = True  # recorded only when used
    if args.method == "gptq" and getattr(args, "clip_lambdas", None) is not None:
        from matquant.algorithms.gptq import check_gptq_clip_lambdas

        check_gptq_clip_lambdas(args.clip_lambdas, args.clip or "minmax", args.bits_master)
        kw["clip_lambdas"] = [float(x) for x in args.clip_lambdas]  # recorded only when used
    if args.method == "matgptq":
        kw.update(bits_list=args.bits_list, lambdas=args.lambdas, error_feedback=args.error_feedback,
                  group_params=args.group_params, propagate=args.propagate)
        from matquant.algorithms.matgptq import propagate_fn, resolve_bits_lambdas

        bits, _ = resolve_bits_lambdas(args.bits_master, args.bits_list, args.lambdas)  # bad R / λ: before loading
        propagate_fn(args.propagate, args.bits_master, args.slicing)
        if getattr(args, "clip_lambdas", None) is not None:
            try:
                check_clip_lambdas(args.clip_lambdas, args.clip or "minmax", args.bits_master, bits)
            except ValueError as e:
                if "clip_lambdas" not in getattr(args, "_from_recipe", ()):
                    raise
                from matquant.algorithms.matgptq import DEFAULT_BITS

                raise ValueError(f"{e} (--recipe {args.recipe} sets --clip-lambdas "
                                 f"{','.join(map(str, RECIPES[args.recipe]['clip_lambdas']))}, for the default R = "
                                 f"{','.join(map(str, DEFAULT_BITS))}: pass --clip-lambdas with one weight per slice "
                                 "of your --bits-list)") from None
            kw["clip_lambdas"] = [float(x) for x in args.clip_lambdas]  # recorded only when used
    return kw


def add_qat_args(p) -> None:
    """Options of --method qat (the calibration windows are its training data)."""
    g = p.add_argument_group("training (--method qat; --lr, --seed, --work-dir, --weight-decay also omniquant)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default 200)")
    g.add_argument("--lr", type=float, default=None, help="AdamW learning rate (qat: peak, default 1e-4; omniquant: constant, default 1e-3)")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 0)")
    g.add_argument("--warmup-steps", type=int, default=None, help="linear warm-up steps, then cosine (default 5%%)")
    g.add_argument("--min-lr-ratio", type=float, default=None, help="final lr / peak lr of the cosine (default 0.1)")
    g.add_argument("--batch-size-train", type=int, default=None, help="windows per micro-batch per process (default 1)")
    g.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default 1)")
    g.add_argument("--max-grad-norm", type=float, default=None, help="gradient clipping norm, 0 = off (default 1)")
    g.add_argument("--qparams", default=None, choices=("minmax", "learnable"),
                   help="minmax: α, z recomputed from the weights every step (default); learnable: trained too")
    g.add_argument("--seed", type=int, default=None, help="data order / RNG seed (default 0)")
    g.add_argument("--work-dir", default=None,
                   help="training checkpoints (qat) or finished blocks (omniquant); rerunning the same command "
                        "resumes from here (qat default OUT.qat-work, deleted after a successful run unless "
                        "--keep-work-dir; a folder you name is always kept)")
    g.add_argument("--keep-work-dir", action="store_true",
                   help="keep the default training-state folder (OUT.qat-work: weights + AdamW moments, ~12 bytes per trained weight) after "
                        "success")
    g.add_argument("--save-every", type=int, default=None, help="checkpoint every N steps; 0 = only at the end "
                                                                 "(default 50)")
    g.add_argument("--train-device", dest="train_device", default=None,
                   help="auto (default: this process's GPU if any), cpu or cuda")
    g.add_argument("--no-amp", dest="amp", action="store_false", default=None, help="no bf16 autocast on GPU")


def qat_kwargs(args) -> dict:
    """--method qat keyword arguments, validated before any work starts."""
    from matquant.algorithms import method_options
    from matquant.algorithms.training.objective import build_objective
    from matquant.algorithms.training.qat_config import make_config

    kw = {k: getattr(args, k, None) for k in method_options("qat")
          if k not in ("device", "step_callback", "clip", "slice_params")}
    kw["device"] = getattr(args, "train_device", None)
    obj = build_objective(kw["bits_list"], kw["lambdas"], kw["distill"], master_bits=args.bits_master,
                          slicing=args.slicing)
    check_clip_lambdas(kw.get("clip_lambdas"), args.clip or "minmax", args.bits_master, obj.bits)
    make_config(**{k: v for k, v in kw.items() if k not in ("bits_list", "lambdas", "distill", "clip_lambdas")})
    return {k: v for k, v in kw.items() if v is not None}


def add_omniquant_args(p) -> None:
    from matquant.algorithms.omniquant import BLOCK_INPUTS, DEFAULT_EPOCHS, DEFAULT_LR_LWC, LOSS_BALANCE

    g = p.add_argument_group("omniquant (--method omniquant; also --bits-list, --lambdas, --distill, --lr, --seed, "
                             "--work-dir, --weight-decay)")
    g.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS,
                   help="passes over the calibration windows per block (default %(default)s)")
    g.add_argument("--lr-lwc", type=float, default=None,
                   help=f"learning rate of the clipping logits (default {DEFAULT_LR_LWC:g}; see docs/omniquant.md)")
    g.add_argument("--lr-let", type=float, default=None, help="learning rate of the LET scales (default --lr)")
    g.add_argument("--let", action="store_true",
                   help="also learn the equivalent transformation (Llama-style blocks: norm → gate/up, up → down)")
    g.add_argument("--loss-balance", default="none", choices=LOSS_BALANCE,
                   help="none: the paper's sum of lambda_r * loss_r; initial: each loss_r divided by its value at the "
                        "starting (MinMax) clipping, so lambda weights relative improvement and int2's large error "
                        "does not drown int8's (a deviation; see docs/omniquant.md) (default none)")
    g.add_argument("--block-inputs", default="quant", choices=BLOCK_INPUTS,
                   help="quant: each slice sees the quantized previous blocks' output at its precision (OmniQuant); "
                        "fp: every slice sees the full-precision inputs (default quant)")


def omniquant_kwargs(args) -> dict:
    """--method omniquant keyword arguments, validated before any work starts."""
    from matquant.algorithms.omniquant import DEFAULT_LR
    from matquant.algorithms.training.objective import build_objective

    kw = dict(bits_list=args.bits_list, lambdas=args.lambdas, distill=args.distill, epochs=args.epochs,
              lr=args.lr if args.lr is not None else DEFAULT_LR, lr_lwc=args.lr_lwc, lr_let=args.lr_let, let=args.let,
              weight_decay=args.weight_decay,
              block_inputs=args.block_inputs, loss_balance=args.loss_balance, work_dir=args.work_dir,
              seed=args.seed if args.seed is not None else 0, clip_lambdas=getattr(args, "clip_lambdas", None))
    obj = build_objective(kw["bits_list"], kw["lambdas"], kw["distill"], master_bits=args.bits_master,
                          slicing=args.slicing)  # fail before loading the model
    check_clip_lambdas(kw["clip_lambdas"], args.clip or "minmax", args.bits_master, obj.bits)
    return {k: v for k, v in kw.items() if v is not None}


def set_threads(n: int | None) -> int:
    """Fix torch's CPU thread count (None: leave torch's default); returns the count in use."""
    import torch

    if n is not None:
        if n < 1:
            raise ValueError(f"--threads must be >= 1, got {n}.")
        torch.set_num_threads(n)
    return torch.get_num_threads()


def quant_kwargs(args) -> dict:
    from matquant.quant.rotation import make_spec

    resolve_recipe(args)
    make_spec(args.rotate, args.group_size, args.rotate_seed)  # a bad --rotate / --rotate-seed: before loading
    return dict(master_bits=args.bits_master, group_size=args.group_size, scope=args.scope, modules=args.modules,
                symmetric=args.symmetric, slicing=args.slicing, param_dtype=args.param_dtype,
                rotate=args.rotate, rotate_seed=args.rotate_seed, **method_kwargs(args), **clip_kwargs(args))


def clip_kwargs(args) -> dict:
    """--clip as a method option (absent when not given, so the method's default, minmax, is not recorded)."""
    return {} if getattr(args, "clip", None) is None else {"clip": args.clip}


def calibration(args, tokenizer):
    from matquant.algorithms import METHODS, needs_calibration
    from matquant.data import token_windows

    if not needs_calibration(args.method, vars(args)):
        return None
    n, seqlen = getattr(METHODS[args.method], "calib_defaults", (32, 512))
    try:
        return token_windows(tokenizer, args.calib_text, args.calib_seqlen or seqlen, args.calib_windows or n)
    except ValueError as e:
        raise ValueError(f"calibration text too short for --method {args.method}: {e} (calibration flags: "
                         "--calib-text FILE with more text, or a smaller --calib-seqlen)") from None


def register(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model into one multi-precision checkpoint folder",
                       description="Quantize the target linear layers of a model to C-bit master codes and write ONE "
                                   "checkpoint folder from which every precision <= C can be loaded.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="HF hub id, local HF folder, .gguf file, or the embedded 'smollm2-135m' (default)")
    p.add_argument("--out", required=True, help="output checkpoint folder")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    add_quant_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from matquant.algorithms import quantize_model
    from matquant.algorithms.training.distributed import finish_distributed, is_main_process
    from matquant.format.checkpoint import save_checkpoint
    from matquant.models import load_model

    resolve_recipe(args)
    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"{args.out} already exists (a complete checkpoint: it is written atomically, so an "
                              "interrupted run leaves either nothing or all of it there); pass --overwrite or choose "
                              "another --out.")
    default_work = args.method == "qat" and args.work_dir is None
    if default_work:
        args.work_dir = f"{args.out}.qat-work"
    t0 = time.time()
    kw = quant_kwargs(args)  # validates method options before any work
    threads = set_threads(args.threads)
    print(f"loading {args.model} ...")
    model, tok, src = load_model(args.model)
    calib = calibration(args, tok)
    qcfg = quantize_model(model, args.method, calib=calib, **kw)
    main = is_main_process()  # (asked before finish_distributed: after it every process looks like rank 0)
    if main:  # under torchrun every rank trains (DDP); rank 0 writes
        save_checkpoint(model, tok, args.out, qcfg, overwrite=args.overwrite)
        print(f"wrote {args.out}: {len(qcfg.modules)} layers, {args.method}, int{qcfg.master_bits} master, "
              f"group {qcfg.group_size}, slicing {qcfg.slicing} ({time.time() - t0:.0f}s, {threads} threads)")
    finish_distributed()
    if main and getattr(args, "work_dir", None) and Path(args.work_dir).exists():
        if default_work and not getattr(args, "keep_work_dir", False):
            import os
            import shutil
            import tempfile

            # the checkpoint is written: the training state is no longer needed. Renamed away first, so a kill
            # during the removal never leaves a half-deleted OUT.qat-work behind (only a hidden .deleting folder)
            trash = Path(tempfile.mkdtemp(prefix=f".{Path(args.work_dir).name}.deleting-", dir=Path(args.work_dir).parent))
            os.replace(args.work_dir, trash / "w")
            shutil.rmtree(trash, ignore_errors=True)
            print(f"removed the training state {args.work_dir} (pass --keep-work-dir to keep it)")
        else:
            size = sum(f.stat().st_size for f in Path(args.work_dir).rglob("*") if f.is_file())
            print(f"training state kept in {args.work_dir} ({size / 2**20:.0f} MiB); delete it when done")
    return 0
