"""Compare two matquant checkpoint folders tensor by tensor: codes, scales, zeros, every other tensor, and the
quantization_config. Exit 0 when they are bit-identical, 1 otherwise (each difference printed).

    python lab/equivalence/compare_checkpoints.py A B [--ignore-config-key method_args ...]

Works on single-file (model.safetensors) and sharded (model.safetensors.index.json) folders, and on two trees of
such folders (every checkpoint found under A is compared with the one at the same relative path under B).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def tensor_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
    return [folder / "model.safetensors"]


def read_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in tensor_files(folder):
        out.update(load_file(str(f)))
    return out


def quant_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text()).get("quantization_config", {})


def compare(a: Path, b: Path, ignore_keys=()) -> list[str]:
    """The differences between checkpoint folders a and b (empty: bit-identical)."""
    import torch

    diffs = []
    ca, cb = quant_config(a), quant_config(b)
    for k in sorted(set(ca) | set(cb)):
        if k not in ignore_keys and ca.get(k) != cb.get(k):
            diffs.append(f"quantization_config.{k}: {ca.get(k)!r} != {cb.get(k)!r}")
    ta, tb = read_tensors(a), read_tensors(b)
    for name in sorted(set(ta) ^ set(tb)):
        diffs.append(f"tensor {name}: only in {a if name in ta else b}")
    for name in sorted(set(ta) & set(tb)):
        x, y = ta[name], tb[name]
        if x.dtype != y.dtype or x.shape != y.shape:
            diffs.append(f"tensor {name}: {x.dtype}{tuple(x.shape)} != {y.dtype}{tuple(y.shape)}")
        elif not torch.equal(x.view(torch.uint8) if x.dtype.is_floating_point else x,
                             y.view(torch.uint8) if y.dtype.is_floating_point else y):
            n = int((x != y).sum())
            diffs.append(f"tensor {name}: {n} of {x.numel()} elements differ, max |a - b| = {max_abs_diff(x, y):.6g}")
    return diffs


def max_abs_diff(x, y) -> float:
    """Largest elementwise |x - y| (codes as integers, parameters in float64; NaN where either is NaN)."""
    if x.dtype.is_floating_point:
        return float((x.double() - y.double()).abs().max())
    return float((x.long() - y.long()).abs().max())


def checkpoints_under(root: Path) -> list[Path]:
    return sorted(p.parent.relative_to(root) for p in root.rglob("config.json")
                  if (p.parent / "model.safetensors").exists() or (p.parent / "model.safetensors.index.json").exists())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    p.add_argument("--ignore-config-key", action="append", default=[],
                   help="a quantization_config key not to compare (repeatable)")
    args = p.parse_args(argv)
    pairs = ([(args.a, args.b, ".")] if (args.a / "config.json").exists()
             else [(args.a / r, args.b / r, str(r)) for r in checkpoints_under(args.a)])
    if not pairs:
        print(f"no checkpoint under {args.a}", file=sys.stderr)
        return 2
    bad = 0
    for a, b, label in pairs:
        if not (b / "config.json").exists():
            print(f"{label}: MISSING in {args.b}")
            bad += 1
            continue
        diffs = compare(a, b, args.ignore_config_key)
        print(f"{label}: {'identical' if not diffs else 'DIFFERENT'}")
        for d in diffs:
            print(f"    {d}")
        bad += bool(diffs)
    print(f"{len(pairs) - bad} of {len(pairs)} checkpoints bit-identical")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
