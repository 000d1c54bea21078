"""Histograms of the int-c master codes of matquant checkpoints (issue 14, 'The paper's own observation').

The MatQuant paper reports that training shifts the int8 code distribution to the right (more mass in the upper
codes), which lets the int2 slice use its levels. This script reads the `<module>.qweight` tensors of each
checkpoint directly from its model.safetensors (no model is built), pools the codes of every quantized layer and
plots one log-y histogram per panel (checkpoints sharing a panel name are overlaid), and writes summary numbers:
mean code, fraction of codes in the bottom / top quarter of the master range, and the fraction of weights on
each level of the int4 and int2 slices in the checkpoint's slicing mode (`matquant.quant.slicing.slice_codes`).

    python lab/scripts/code_histograms.py --out docs/img/code_hist_smollm2.png --json lab/results/code_hist.json \\
        nested:rtn=WORK/codehist/smollm2-ffn-g64-rtn-nested \\
        nested:omniquant=WORK/codehist/smollm2-ffn-g64-omniquant-nested ...

Each positional argument is PANEL:LABEL=CHECKPOINT_DIR; an optional @MODE suffix (LABEL@paper=DIR) reads the
slices in another slicing mode than the checkpoint's own (the codes of RTN do not depend on the mode).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))

from matquant.quant.slicing import SLICING_MODES, slice_codes  # noqa: E402


def read_codes(ckpt: Path) -> tuple[torch.Tensor, dict]:
    """(histogram of the master codes pooled over every quantized layer [2^c], quantization_config)."""
    from safetensors import safe_open

    cfg_path = ckpt / "config.json"
    if not cfg_path.is_file():
        raise SystemExit(f"{ckpt} is not a matquant checkpoint (no config.json); pass a `matquant quantize --out` "
                         "folder.")
    qcfg = json.loads(cfg_path.read_text()).get("quantization_config")
    if not qcfg or qcfg.get("quant_method") != "matquant":
        raise SystemExit(f"{ckpt}/config.json has no matquant quantization_config.")
    c = int(qcfg["master_bits"])
    hist = torch.zeros(2**c, dtype=torch.int64)
    files = sorted(ckpt.glob("*.safetensors"))
    if not files:
        raise SystemExit(f"{ckpt} has no .safetensors file.")
    n = 0
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                if k.endswith(".qweight"):
                    hist += torch.bincount(st.get_tensor(k).flatten().to(torch.int64), minlength=2**c)[: 2**c]
                    n += 1
    if n == 0:
        raise SystemExit(f"{ckpt} holds no .qweight tensor.")
    return hist, {**qcfg, "layers": n}


def summarize(hist: torch.Tensor, c: int, mode: str) -> dict:
    total = int(hist.sum())
    codes = torch.arange(2**c)
    p = hist.double() / total
    q = 2**c // 4
    out = {"weights": total, "mean_code": float((p * codes).sum()), "mean_code_over_max": float((p * codes).sum())
           / (2**c - 1), "bottom_quarter": float(p[:q].sum()), "top_quarter": float(p[-q:].sum()),
           "std_code": float(((p * (codes - (p * codes).sum()) ** 2).sum()).sqrt()), "slicing": mode}
    for r in (4, 2):
        if r >= c:
            continue
        lv = slice_codes(codes, c, r, mode)
        use = torch.zeros(int(lv.max()) + 1, dtype=torch.float64).index_add_(0, lv.long(), p)
        out[f"int{r}_levels"] = [round(float(x), 5) for x in use]
        nz = use[use > 0]
        out[f"int{r}_entropy_bits"] = float(-(nz * nz.log2()).sum())
    return out


def parse_spec(s: str):
    if ":" not in s or "=" not in s:
        raise SystemExit(f"bad argument {s!r}: expected PANEL:LABEL=CHECKPOINT_DIR (LABEL may end in @MODE).")
    head, path = s.split("=", 1)
    panel, label = head.split(":", 1)
    mode = None
    if "@" in label:
        label, mode = label.split("@", 1)
        if mode not in SLICING_MODES:
            raise SystemExit(f"unknown slicing mode {mode!r} in {s!r}; choose among {', '.join(SLICING_MODES)}.")
    return panel, label, mode, Path(path)


def plot(panels: dict, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matquant.eval.plot import save_figure

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), dpi=100, squeeze=False)
    for ax, (panel, entries) in zip(axes[0], panels.items()):
        for label, hist, s in entries:
            c = int(math.log2(len(hist)))
            p = hist.double() / hist.sum()
            ax.step(range(2**c), p.numpy(), where="mid", lw=1,
                    label=f"{label} (mean {s['mean_code']:.1f}, top¼ {100 * s['top_quarter']:.1f}%)")
        for b in (64, 128, 192):
            ax.axvline(b, c="grey", lw=0.5, ls=":")
        ax.set_yscale("log")
        ax.set_xlabel("int8 master code (pooled over all quantized weights)")
        ax.set_ylabel("fraction of weights (log)")
        ax.set_title(f"{title} — {panel}", fontsize=9)
        ax.legend(fontsize=7, loc="lower center")
        ax.grid(True, which="major", alpha=0.3)
    save_figure(fig, out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+", help="PANEL:LABEL[@MODE]=CHECKPOINT_DIR")
    ap.add_argument("--out", required=True, help="PNG path")
    ap.add_argument("--json", help="write the summary numbers here (JSON)")
    ap.add_argument("--title", default="int8 master codes")
    a = ap.parse_args()
    panels: dict = {}
    summary = []
    for spec in a.specs:
        panel, label, mode, path = parse_spec(spec)
        hist, qcfg = read_codes(path)
        c = int(qcfg["master_bits"])
        s = summarize(hist, c, mode or qcfg["slicing"])
        s.update({"panel": panel, "label": label, "checkpoint": str(path), "method": qcfg.get("method"),
                  "trained_for": qcfg["slicing"], "group_size": qcfg["group_size"], "scope": qcfg.get("scope"),
                  "layers": qcfg["layers"], "histogram": hist.tolist()})
        summary.append(s)
        panels.setdefault(panel, []).append((label, hist, s))
        print(f"{panel:>8} {label:<28} mean {s['mean_code']:6.2f} (std {s['std_code']:5.2f})  bottom¼ "
              f"{100 * s['bottom_quarter']:5.2f}%  top¼ {100 * s['top_quarter']:5.2f}%  int2 levels "
              f"{[round(100 * x, 1) for x in s.get('int2_levels', [])]} ({s.get('int2_entropy_bits', 0):.3f} bits)  "
              f"int4 entropy {s.get('int4_entropy_bits', 0):.3f} bits  [{s['slicing']}]")
    plot(panels, Path(a.out), a.title)
    if a.json:
        from matquant.format.atomic import atomic_write_json

        atomic_write_json(a.json, {"checkpoints": summary})
    print(f"wrote {a.out}" + (f" and {a.json}" if a.json else ""))


if __name__ == "__main__":
    main()
