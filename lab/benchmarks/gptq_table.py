"""Markdown tables from the JSON files written by lab/benchmarks/gptq_ppl.py (one row per method, one column per slice).

    python lab/benchmarks/gptq_table.py bench-gptq/ffn-a.json bench-gptq/ffn-b.json
"""
from __future__ import annotations

import json
import sys

NAMES = {
    "rtn8": "RTN int8, sliced", "gptq8": "GPTQ int8, sliced", "gptq": "GPTQ dedicated (one model per bit-width)",
}


def label(cfg: str) -> str:
    if cfg.startswith("matgptq-"):
        p = cfg.split("-")
        fb = {"w": "λ-weighted", "m": "mean", "x": "master"}[p[1]]
        if "l16" not in p:
            fb += ", λ=(.1,.1,1)"
        extra = {"s": ", group search", "r4": ", R=8,4,3,2", "l16": ", λ=(16,4,1)"}

        def variant(v):
            if v in extra:
                return extra[v]
            if v.startswith("R") and v[1:].isdigit():
                return ", R=" + ",".join(v[1:])
            if v.startswith("L"):
                return ", λ=(" + ",".join(v[1:].split("_")) + ")"
            if v.startswith("P"):
                return f", propagate {v[1:]}"
            return ", " + v
        if any(v.startswith("L") for v in p[3:]):  # explicit λ: the default-λ note does not apply
            fb = {"w": "λ-weighted", "m": "mean", "x": "master"}[p[1]]
        return f"MatGPTQ int8 ({fb} feedback{''.join(variant(v) for v in p[3:])}), built for {p[2]}"
    if cfg.startswith("gptq") and cfg != "gptq8":
        return NAMES["gptq"]
    return NAMES.get(cfg, cfg)


def main(paths):
    rows, meta = [], {}
    for p in paths:
        d = json.load(open(p))
        rows += d["rows"]
        meta = meta or d["meta"]
    fp = next((r["ppl"] for r in rows if r["config"] == "fp32"), None)
    bits = sorted({r["bits"] for r in rows if r["config"] != "fp32"}, reverse=True)
    table: dict[tuple, dict] = {}
    all_modes = sorted({r["slicing"] for r in rows if r["slicing"] in ("paper", "nested", "extra")})
    for cfg in dict.fromkeys(r["config"] for r in rows if r["config"] != "fp32"):
        rs = [r for r in rows if r["config"] == cfg]
        modes = sorted({r["slicing"] for r in rs if r["slicing"] in all_modes})
        if cfg.startswith("matgptq-"):
            modes = [cfg.split("-")[2]]
        for m in modes or all_modes:
            for r in rs:
                if r["slicing"] in (m, "any") or (cfg.startswith("matgptq-") and r["bits"] == 8):
                    table.setdefault((label(cfg), m), {})[r["bits"]] = r["ppl"]
    print(f"Model {meta.get('model')}, scope {meta.get('scope')}, group {meta.get('group_size')}, calibration "
          f"{meta.get('calib')}, eval {meta.get('eval')}, fp32 ppl {fp:.3f}" if fp else "")
    print()
    print("| method | slicing | " + " | ".join(f"int{b}" for b in bits) + " |")
    print("|---|---|" + "---|" * len(bits))
    for (name, mode), v in sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        cells = []
        for b in bits:
            if b in v:
                cells.append(f"{v[b]:.2f} ({v[b] / fp:.2f}×)" if fp else f"{v[b]:.2f}")
            else:
                cells.append("—")
        print(f"| {name} | {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
