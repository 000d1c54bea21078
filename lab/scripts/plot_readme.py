"""The README's picture: perplexity vs bits per weight on SmolLM2-135M, FFN layers only, from stored results.

    python lab/scripts/plot_readme.py          # writes docs/img/readme_ppl_vs_bits.png

Series (nothing is re-measured; every point is on the same 6 × 2048-token `eval` windows, fp32 perplexity 18.415):
- one matquant checkpoint: `--recipe quality` (MatGPTQ + weighted clipping search + slice-own scale/zero), FFN,
  group 64, nested slicing; its int8/6/4/3/2 slices, scored inside matquant
  (lab/results/quality_grid/results.jsonl, label "quality slice-params own-master");
- dedicated models: one GPTQ model per bit-width with the same clipping search, FFN, group 64 (same store,
  labels "gptq{4,3,2} clip weighted");
- llama.cpp's types: llama-quantize of the fp32 reference GGUF with the FFN tensors in each type (attention in Q4_1,
  which is lossless here because the reference is itself a Q4_1 GGUF; token embedding Q8_0), with and without an
  importance matrix, read by transformers' GGUF loader (lab/results/export/peer2.jsonl, peer3.jsonl; files
  `ref-ffn-TYPE[-im].gguf`).
x: bits per FFN weight — for matquant the served slice's codes + its fp16 scale and zero per group of 64; for
llama.cpp the FFN tensors' bytes in the file. All series are FFN-only; none mixes in whole-model numbers.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
RES = ROOT / "lab" / "results"
OUT = ROOT / "docs" / "img" / "readme_ppl_vs_bits.png"
CHECKPOINT = "quality slice-params own-master"
DEDICATED = re.compile(r"gptq(\d) clip weighted")
LABEL_OFFSET = {"Q3_K_M": (24, -2)}  # llama.cpp type labels that would overlap (points, in pixels)


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def grid_points() -> tuple[float, list, list]:
    """(fp32 ppl, [(bits/weight, ppl, bits)] of the one checkpoint, the same of the dedicated models)."""
    fp32, sliced, dedicated = None, [], []
    for r in _jsonl(RES / "quality_grid" / "results.jsonl"):
        c = r["config"]
        if c["eval"] != "ppl" or c["model"] != "smollm2-135m":
            continue
        q = c["quant"]
        if q is None:
            fp32 = r["result"]["ppl"]
            continue
        if q["scope"] != "ffn" or q["group_size"] != 64:
            continue
        pt = (r["result"]["effective_bits"], r["result"]["ppl"], c["bits"])
        if q["label"] == CHECKPOINT:
            sliced.append(pt)
        elif DEDICATED.fullmatch(q["label"]):
            dedicated.append(pt)
    return fp32, sorted(sliced), sorted(dedicated)


def llamacpp_points() -> dict[bool, list]:
    """{with importance matrix: [(FFN bits/weight, ppl, type)]} of the FFN-scope llama.cpp files."""
    out = {False: {}, True: {}}
    for name in ("peer2.jsonl", "peer3.jsonl"):
        for r in _jsonl(RES / "export" / name):
            m = re.fullmatch(r"ref-ffn-(\w+?)(-im)?\.gguf", Path(r["file"]).name)
            if m and r.get("ppl") is not None and r.get("windows") == 6:
                out[bool(m.group(2))][m.group(1)] = (r["ffn_bits_per_weight"], r["ppl"], m.group(1))
    return {k: sorted(v.values()) for k, v in out.items()}


def main() -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matquant.eval.plot import save_figure

    fp32, sliced, dedicated = grid_points()
    peers = llamacpp_points()
    fig, ax = plt.subplots(figsize=(7.5, 4.6), dpi=120)
    ax.plot([p[0] for p in sliced], [p[1] for p in sliced], "o-", lw=2, color="C0",
            label="matquant: ONE checkpoint (--recipe quality), its int8/6/4/3/2 slices")
    for x, y, b in sliced:
        ax.annotate(f"int{b}", (x, y), textcoords="offset points", xytext=(4, 5), fontsize=7, color="C0")
    ax.plot([p[0] for p in dedicated], [p[1] for p in dedicated], "s--", color="C1",
            label="dedicated GPTQ model per bit-width (same clipping search)")
    for im, marker, color in ((False, "^", "C2"), (True, "v", "C3")):
        pts = peers[im]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=marker, s=45, zorder=4, color=color,
                   label=("llama.cpp types (" + ", ".join(p[2] for p in pts) + ")") if not im
                   else "the same llama.cpp types + importance matrix")
        if not im:
            for x, y, t in pts:
                dx, dy = LABEL_OFFSET.get(t, (-8, 4))
                ax.annotate(t, (x, y), textcoords="offset points", xytext=(dx, dy), ha="right" if dx < 0 else "left",
                            fontsize=6, color=color)
    ax.axhline(fp32, ls=":", c="k", lw=1, label=f"fp32 ({fp32:.2f})")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_yticks([20, 25, 30, 40, 60, 100])
    ax.set_xlabel("bits per FFN weight (codes + scales; llama.cpp: file bytes)")
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.set_title("SmolLM2-135M, FFN layers quantized, 6×2048 held-out tokens (docs/results.md, docs/export.md)",
                 fontsize=9)
    ax.grid(True, which="both", alpha=.3)
    ax.legend(fontsize=7)
    save_figure(fig, OUT)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
