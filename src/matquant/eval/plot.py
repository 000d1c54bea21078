"""PNG plots: perplexity vs bits per weight."""
from __future__ import annotations

from collections import defaultdict


def plot_ppl_vs_bits(rows: list[dict], ref_ppl: float | None, path, title: str = "") -> None:
    """rows: {"series", "bits", "ppl"}; one line per series, log-scale perplexity, fp32 as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = defaultdict(list)
    for r in rows:
        if isinstance(r["bits"], (int, float)):
            series[r["series"]].append((r.get("x", r["bits"]), r["ppl"]))
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    markers = "osD^v<>px*"
    for i, (name, pts) in enumerate(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)], label=name)
    if ref_ppl:
        ax.axhline(ref_ppl, ls="--", c="k", lw=1, label=f"fp32 ({ref_ppl:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("bits per weight (codes)")
    ax.set_ylabel("perplexity (log scale, lower is better)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def save_figure(fig, path) -> None:
    """Lay out, render to PNG and write atomically; closes the figure."""
    import io

    import matplotlib.pyplot as plt

    from matquant.format.atomic import atomic_write_bytes

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
