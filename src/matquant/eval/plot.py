"""PNG plots of quality vs bits per weight: the one plotting path of matquant (the demo's ppl_vs_bits.png, and the
perplexity / zero-shot plots of `matquant report` and experiment grids)."""
from __future__ import annotations

import io
from collections import defaultdict

from matquant.format.atomic import atomic_write_bytes

MARKERS = "osD^v<>px*h"


def pareto(points: list[tuple[float, float]], higher_is_better: bool) -> list[tuple[float, float]]:
    """Points not dominated by any other (fewer or equal bits AND better or equal quality), sorted by bits."""
    pts = sorted(points, key=lambda p: (p[0], -p[1] if higher_is_better else p[1]))
    front, best = [], None
    for x, y in pts:
        if best is None or (y > best if higher_is_better else y < best):
            front.append((x, y))
            best = y
    return front


def plot_quality_vs_bits(series: dict[str, list[tuple[float, float]]], path, *, xlabel: str, ylabel: str,
                         ref: float | None = None, mixnmatch: dict[str, list[tuple[float, float]]] | None = None,
                         frontier: bool = False, higher_is_better: bool = False, log_y: bool = True, title: str = "",
                         figsize=(7.5, 4.8), title_fontsize: float | None = 10, legend_fontsize: float = 7,
                         alpha: float | None = .85) -> None:
    """One line per series ({name: [(bits, quality)]}), Mix'n'Match points as stars, optionally the Pareto frontier
    over all points, the fp32 reference `ref` as a dashed line; written atomically to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mixnmatch = mixnmatch or {}
    fig, ax = plt.subplots(figsize=figsize, dpi=120)
    for i, (name, pts) in enumerate(series.items()):
        pts = sorted(pts)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=MARKERS[i % len(MARKERS)], label=name,
                **({} if alpha is None else {"alpha": alpha}))
    for name, pts in mixnmatch.items():
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker="*", s=120, label=f"{name} Mix'n'Match",
                   zorder=4)
    if frontier:
        front = pareto([p for pts in list(series.values()) + list(mixnmatch.values()) for p in pts],
                       higher_is_better)
        ax.plot([p[0] for p in front], [p[1] for p in front], color="k", lw=3, alpha=.25, zorder=1,
                label="Pareto frontier")
        ax.scatter([p[0] for p in front], [p[1] for p in front], facecolors="none", edgecolors="k", s=110, zorder=5)
    if ref is not None:
        ax.axhline(ref, ls="--", c="k", lw=1, label=f"fp32 ({ref:.2f})")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, **({} if title_fontsize is None else {"fontsize": title_fontsize}))
    ax.grid(True, which="both", alpha=.3)
    ax.legend(fontsize=legend_fontsize)
    save_figure(fig, path)


def plot_ppl_vs_bits(rows: list[dict], ref_ppl: float | None, path, title: str = "") -> None:
    """The demo's plot. rows: {"series", "bits", "ppl"} (optional "x" for the bits axis); rows whose bits are not a
    number (a bits map) are left out."""
    series = defaultdict(list)
    for r in rows:
        if isinstance(r["bits"], (int, float)):
            series[r["series"]].append((r.get("x", r["bits"]), r["ppl"]))
    plot_quality_vs_bits(series, path, ref=ref_ppl or None, xlabel="bits per weight (codes)",
                         ylabel="perplexity (log scale, lower is better)", title=title, figsize=(7, 4.5),
                         title_fontsize=None, legend_fontsize=8, alpha=None)


def save_figure(fig, path) -> None:
    """Lay out, render to PNG and write atomically; closes the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
