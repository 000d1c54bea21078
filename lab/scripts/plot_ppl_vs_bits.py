"""Perplexity ÷ fp32 vs bits per weight, every method on one figure (issue 14), from the stored result files.

    python lab/scripts/plot_ppl_vs_bits.py            # writes docs/img/ppl_vs_bits_{smollm2_ffn,smollm2_ffn_attn,qwen}.png

Sources (the same raw files the docs/results.md tables come from; nothing is re-measured):
- SmolLM2-135M, 6 × 2048 `eval` windows: lab/results/gptq_grid_ffn.json, gptq_grid_ffn_attn.json
  (RTN / GPTQ / MatGPTQ) and lab/results/omni/*.json (OmniQuant + MatQuant); QAT from
  lab/results/qat_smollm2_nested.json ÷ qat_smollm2_fp32.json (8 windows; 2 k training tokens); the recipe
  and clipping-search rows from the issue-14 grids' store lab/results/quality_grid/results.jsonl.
- Qwen2.5-Coder-0.5B: lab/results/qwen_tables.jsonl (lab/benchmarks/qwen_tables.py); each row divided by the
  fp32 perplexity on the same windows; rows on fewer than 6 windows are labelled.

x = effective bits per weight: code bits + the fp16 scale and zero of every group (32 / group size).
Two panels: all precisions (log y), and a zoom on 3–8.5 bits.
"""
from __future__ import annotations

import json
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))
RES = ROOT / "lab" / "results"
IMG = ROOT / "docs" / "img"


def _gptq_series(path: Path, g: int) -> dict:
    d = json.loads(path.read_text())
    fp = next(r["ppl"] for r in d["rows"] if r["config"] == "fp32")
    names = {"rtn8": "RTN int8 sliced", "gptq8": "GPTQ int8 sliced",
             "matgptq-w-nested-R8432-L16_4_2_1": "MatGPTQ (default)"}
    out = defaultdict(list)
    for r in d["rows"]:
        c, b, mode = r["config"], r["bits"], r["slicing"]
        if c == "gptq8" and mode == "any":  # the int8 model is also the dedicated int8 point
            out["GPTQ dedicated (one model per bit)"].append((b + 32 / g, r["ppl"] / fp))
        if c in names and mode in ("nested", "any"):
            out[f"{names[c]}, nested"].append((b + 32 / g, r["ppl"] / fp))
        elif c in ("rtn8",) and mode == "paper":
            out["RTN int8 sliced, paper"].append((b + 32 / g, r["ppl"] / fp))
        elif c.startswith("gptq") and c[4:].isdigit() and c != "gptq8":
            out["GPTQ dedicated (one model per bit)"].append((b + 32 / g, r["ppl"] / fp))
    if "RTN int8 sliced, paper" in out:  # int8 is mode-independent ("any")
        out["RTN int8 sliced, paper"] += [p for p in out["RTN int8 sliced, nested"] if p[0] == 8 + 32 / g]
    return out, fp


def _omni_series(fp: float) -> dict:
    runs = {"matquant_842_nested": "OmniQuant MatQuant [8,4,2], nested",
            "matquant_842_paper": "OmniQuant MatQuant [8,4,2], paper",
            "matquant_842_bal_l001_nested": "OmniQuant MatQuant balanced λ=(.01,.01,1), nested"}
    out = defaultdict(list)
    for stem, label in runs.items():
        d = json.loads((RES / "omni" / f"{stem}.json").read_text())
        out[label] = [(r["effective_bits"], r["ppl"] / fp) for r in d["rows"]]
    for b in (8, 6, 4, 3, 2):
        d = json.loads((RES / "omni" / f"dedicated_int{b}_nested.json").read_text())
        out["OmniQuant dedicated (one model per bit)"] += [(r["effective_bits"], r["ppl"] / fp) for r in d["rows"]]
    return out


def _qat_series() -> dict:
    d = json.loads((RES / "qat_smollm2_nested.json").read_text())
    run = d["runs"]["matquant-nested@8x1x256-lr0.0003"]
    fp8 = json.loads((RES / "qat_smollm2_fp32.json").read_text())["runs"]["fp32"]["ppl"]["fp32"]  # same 8 windows
    return {"QAT MatQuant [8,4,2], nested (2 k tokens; 8 windows)":
            [(int(k.split("/")[0][3:]) + 0.5, v / fp8) for k, v in run["ppl"].items()]}


def _qwen_series(path: Path) -> dict:
    from matquant.experiments.store import ResultStore

    recs = ResultStore(path).records()
    ref = {r["config"]["eval"]["windows"]: r["result"]["ppl"] for r in recs if r["config"]["quant"] is None}
    out = defaultdict(list)
    scope = {"ffn": "FFN", "ffn+attn": "FFN+attn"}
    for r in recs:
        c = r["config"]
        q, w = c["quant"], c["eval"]["windows"]
        if q is None or w not in ref:
            continue
        extra = re.findall(r"\+([a-z_]+=[^+]*)", c["config"])  # e.g. clip_lambdas
        if q.get("recipe") == "quality" and extra == ["clip_lambdas=4096:16:4:1"]:
            who, extra = "balanced recipe", []  # measured before `balanced` had its name: the same options
        elif q.get("recipe"):
            who = f"{q['recipe']} recipe"
        else:
            who = "MatGPTQ (default)" if q["method"] == "matgptq" else q["method"].upper()
        who += "".join(f" +{o}" for o in extra)
        label = f"{who}, " \
                f"{scope.get(q['scope'], q['scope'])} g{q['group_size']}" + ("" if w >= 6 else f" ({w} eval window{'s' if w > 1 else ''})")
        out[label].append((r["result"]["effective_bits"], r["result"]["ppl"] / ref[w]))
    return out


# the issue-14 grids' store (lab/grids/quality_smollm2*.yaml, clip_*_smollm2.yaml): label in the store -> plot label
GRID_STORE = RES / "quality_grid" / "results.jsonl"
GRID_SERIES = {"quality": "quality, shared α, z (the recipe until 2026-12-03), nested",
               "quality slice-params own-master": "quality recipe (MatGPTQ + clip weighted + slice-own α, z), nested",
               "quality clip-lambdas 4096,16,4,1": "balanced recipe, nested",
               "quality clip-lambdas 256,4,2,1": "quality --clip-lambdas 256,4,2,1 (shared α, z), nested",
               "gptq8 sliced clip weighted": "GPTQ int8 sliced + clip weighted, nested",
               "gptq8 sliced clip weighted slice-params own": "GPTQ int8 sliced + clip weighted + slice-own α, z "
                                                               "(first version)",
               "qat 842 learnable clip weighted": "QAT MatQuant [8,4,2] + clip weighted (8 k tokens)",
               "qat 842 learnable clip weighted clip-lambdas 16,4,1": "QAT MatQuant [8,4,2] + clip weighted "
                                                                       "--clip-lambdas 16,4,1 (8 k tokens)",
               "omniquant 842 bal l001 clip weighted": "OmniQuant MatQuant balanced λ + clip weighted",
               "omniquant 842 bal l001 clip weighted clip-lambdas 16,4,1": "OmniQuant MatQuant balanced λ + clip "
                                                                            "weighted --clip-lambdas 16,4,1",
               "rtn clip mse + own": "RTN --clip mse + slice-own α, z, nested",
               "qat 842 learnable clip weighted clip-lambdas 16,4,1 + own": "QAT MatQuant [8,4,2] + clip weighted "
                                                                            "--clip-lambdas 16,4,1 + slice-own α, z",
               "omniquant 842 bal l001 clip weighted clip-lambdas 16,4,1 + own": "OmniQuant MatQuant balanced λ + "
                                                                                 "clip weighted 16,4,1 + slice-own α, z",
               "quality rotate residual": "quality recipe --rotate residual, nested"}
DEDICATED_CLIP = re.compile(r"gptq([2-8]) clip weighted")  # one model per bit, the search for its own slice


def _grid_series(path: Path, scope: str) -> dict:
    from matquant.experiments.store import ResultStore

    if not path.exists():
        return {}
    recs = [r for r in ResultStore(path).records() if r["config"].get("eval") == "ppl"]
    ref = next((r["result"]["ppl"] for r in recs if r["config"]["quant"] is None), None)
    out = defaultdict(list)
    for r in recs:
        q = r["config"]["quant"]
        if q is None or ref is None or q["scope"] != scope:
            continue
        label = "balanced recipe, nested" if q["label"] == "balanced" else GRID_SERIES.get(q["label"])
        if scope == "ffn+attn" and q["label"] == "quality slice-params own":  # measured after own took its meaning
            label = GRID_SERIES["quality slice-params own-master"]
        if DEDICATED_CLIP.fullmatch(q["label"]):
            label = "GPTQ dedicated + clip weighted (one model per bit)"
        if label:
            out[label].append((r["result"]["effective_bits"], r["result"]["ppl"] / ref))
    return out


def plot(series: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matquant.eval.plot import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), dpi=90)
    markers = "osD^v<>px*h"
    for i, (name, pts) in enumerate(sorted(series.items())):
        pts = sorted(set(pts))
        style = {"marker": markers[i % len(markers)], "label": name, "ms": 4, "lw": 1.2,
                 "ls": "--" if "dedicated" in name else "-"}
        for ax in axes:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], **style)
    for ax in axes:
        ax.axhline(1.0, c="k", lw=0.8, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("effective bits per weight (codes + fp16 scale/zero per group)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("perplexity ÷ fp32 (log)")
    axes[0].set_title(f"{title}: all slices", fontsize=9)
    axes[1].set_xlim(3.0, 8.8)
    axes[1].set_ylim(0.98, 6.0)
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    axes[1].yaxis.set_major_locator(FixedLocator([1, 1.05, 1.1, 1.2, 1.5, 2, 3, 4, 5]))
    axes[1].yaxis.set_major_formatter(ScalarFormatter())
    axes[1].yaxis.set_minor_formatter(NullFormatter())
    axes[1].set_title("zoom: 3–8.5 bits", fontsize=9)
    axes[1].legend(fontsize=6.5, loc="upper right")
    save_figure(fig, path)
    print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")


def main():
    s_ffn, fp = _gptq_series(RES / "gptq_grid_ffn.json", 64)
    s_ffn.update(_omni_series(fp))
    s_ffn.update(_qat_series())
    s_ffn.update(_grid_series(GRID_STORE, "ffn"))
    plot(s_ffn, IMG / "ppl_vs_bits_smollm2_ffn.png", "SmolLM2-135M, FFN, g64")
    s_att, _ = _gptq_series(RES / "gptq_grid_ffn_attn.json", 64)
    s_att.update(_grid_series(GRID_STORE, "ffn+attn"))
    plot(s_att, IMG / "ppl_vs_bits_smollm2_ffn_attn.png", "SmolLM2-135M, FFN+attention, g64")
    q = RES / "qwen_tables.jsonl"
    if q.exists():
        plot(_qwen_series(q), IMG / "ppl_vs_bits_qwen.png", "Qwen2.5-Coder-0.5B")
    else:
        print(f"{q} does not exist yet: run lab/benchmarks/qwen_tables.py first")


if __name__ == "__main__":
    main()
