"""matquant info: what a checkpoint holds."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("info", help="show a checkpoint's quantization config and size")
    p.add_argument("checkpoint")
    p.add_argument("--modules", action="store_true", help="list every quantized module")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from matquant.format.checkpoint import check_checkpoint

    # the checks `matquant.load` makes before reading tensor values (nothing allocated for weights): a folder whose
    # config.json does not match its tensors is an error here too, not a normal-looking summary
    cfg, q, headers = check_checkpoint(args.checkpoint)
    print(f"{args.checkpoint}: {cfg.get('model_type')} model, {len(q.modules)} quantized layers ({q.scope})")
    print(f"  method {q.method}, int{q.master_bits} master codes, group size {q.group_size}, "
          f"{'symmetric' if q.symmetric else 'asymmetric'}, slicing {q.slicing}, default bits {q.default_bits}"
          + (f", bits map with {len(q.bits_map)} entries" if q.bits_map else ""))
    opts = {k: v for k, v in (q.method_args or {}).items() if v is not None and v is not False}
    if opts:  # the options the method ran with (what a recipe filled in is recorded here, not the recipe's name)
        print("  method options: " + ", ".join(f"{k}={v}" if v is not True else k for k, v in sorted(opts.items())))
    if q.rotation:
        how = ("folded into the weights: nothing runs online" if q.rotation["mode"] == "residual"
               else "applied online at inference")
        print("  rotation: " + ", ".join(f"{k} {v}" for k, v in q.rotation.items()) + f" ({how})")
    size = sum(p.stat().st_size for p in headers) / 2**20
    print(f"  weights file {size:.1f} MiB" if len(headers) == 1 else
          f"  weights {size:.1f} MiB in {len(headers)} shards")
    if args.modules:
        for m in q.modules:
            print("  ", m)
    return 0
