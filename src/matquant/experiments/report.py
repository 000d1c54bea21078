"""Tables and plots: every table matquant prints (`format_table` for the rows of one run — `matquant demo`,
`matquant eval` — and a results store's tables), the plots drawn by `matquant.eval.plot`, the one plotting path.

Tables (markdown, also printed by `matquant report`), per model and eval setting:
- perplexity: one row per (method, scope, slicing), one column per precision (fp32 reference first);
- zero-shot task average (%): same layout (the paper's Tables 1-3 layout: methods × int8/int4/int2 columns);
- zero-shot per task: one row per (method, scope, slicing, bits), acc and acc_norm of every task.
Plots: ppl and task average vs effective bits per weight, one series per (method, slicing), Mix'n'Match points as
separate markers, the Pareto frontier (best quality at or below each bit budget) drawn over all points.
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path

from matquant.experiments.store import ResultStore
from matquant.format.atomic import atomic_write_text


def _bits_label(b) -> str:
    if isinstance(b, dict):
        return f"M&M {b['schedule']}@{b['target']:g}"
    return "fp32" if b == "fp32" else f"int{b}"


def _series(rec) -> str:
    q = rec["config"]["quant"]
    if q is None:
        return "fp32"
    return f"{q['label']} [{q.get('scope', 'ckpt')}, {q['slicing']}]"


def _setting(cfg: dict) -> str:
    """The evaluation setting (everything but model/quant/bits), to keep incomparable numbers apart."""
    keep = {k: v for k, v in cfg.items() if k not in ("model", "quant", "bits", "eval")}
    if cfg["eval"] == "ppl":
        return f"ppl on {keep.get('text')}, {keep.get('windows')}×{keep.get('seqlen')} tokens"
    lim = keep.get("limit")
    return f"zero-shot, {'full validation sets' if lim is None else f'first {lim} questions per task'}"


def _latest(records: list[dict]) -> list[dict]:
    """One record per key (the last written wins, in the place of the key's first record)."""
    return list({r["key"]: r for r in records}.values())


def format_table(rows: list[dict], ref_ppl: float | None = None, title: str | None = None) -> str:
    """Markdown table of ppl rows (optionally with the ratio to a reference perplexity)."""
    head = "| method | bits | slicing | eff. bits/weight | perplexity |" + (" ÷ fp32 |" if ref_ppl else "")
    sep = "|---|---|---|---|---|" + ("---|" if ref_ppl else "")
    lines = ([f"**{title}**", ""] if title else []) + [head, sep]
    for r in rows:
        ratio = f" {r['ppl'] / ref_ppl:.3f}× |" if ref_ppl else ""
        eff = r.get("effective_bits")
        lines.append(f"| {r.get('method', '')} | {r['bits']} | {r.get('slicing', '')} | "
                     f"{eff if eff is not None else '—'} | {r['ppl']:.3f} |{ratio}")
    return "\n".join(lines)


def build_tables(records: list[dict]) -> str:
    from matquant.eval.zeroshot_tasks import TASKS

    records = _latest(records)
    foreign = [r for r in records if not _is_grid_record(r)]
    records = [r for r in records if _is_grid_record(r)]
    groups = defaultdict(list)
    for r in records:
        groups[(r["config"]["model"], r["config"]["eval"], _setting(r["config"]))].append(r)
    out = []
    for (model, kind, setting), recs in groups.items():
        cols = sorted({_bits_label(r["config"]["bits"]) for r in recs}, key=_col_order)  # _col_order keys are unique
        rows = {}
        for r in recs:
            rows.setdefault(_series(r), {})[_bits_label(r["config"]["bits"])] = r["result"]
        ref = rows.get("fp32", {}).get("fp32", {}).get("ppl") if kind == "ppl" else None
        fmt = (lambda x: f"{x['ppl']:.3f}" + (f" ({x['ppl'] / ref:.3f}×)" if ref else "")) if kind == "ppl" \
            else (lambda x: f"{100 * x['average']:.1f}")
        what = "perplexity (lower is better)" if kind == "ppl" else "zero-shot task average, % (higher is better)"
        ratio = "; in brackets ÷ fp32" if ref else ""
        out += [f"### {model}: {what}", "", f"_{setting}{ratio}; quantize s = the quantization's wall seconds_", "",
                "| method [scope, slicing] | " + " | ".join(cols) + " | quantize s |",
                "|---|" + "---|" * (len(cols) + 1)]
        for s, cells in rows.items():
            qs = [c["quantize_seconds"] for c in cells.values() if c.get("quantize_seconds") is not None]
            row = " | ".join(fmt(cells[c]) if c in cells else "" for c in cols)
            out.append(f"| {s} | {row} | {f'{max(qs):.0f}' if qs else ''} |")
        effs = {c: cells[c].get("effective_bits") for cells in rows.values() for c in cells}
        out += ["", "Effective bits per quantized weight (codes + scales/zeros): " +
                ", ".join(f"{c} {effs[c]}" for c in cols if effs.get(c) is not None), ""]
        if kind == "zeroshot":
            tasks = [t for t in TASKS if any(t in r["result"]["tasks"] for r in recs)]
            out += [f"### {model}: zero-shot per task (acc / acc_norm; **bold** = the one averaged)", "",
                    f"_{setting}_", "",
                    "| method [scope, slicing] | bits | " + " | ".join(tasks) + " | avg |",
                    "|---|---|" + "---|" * (len(tasks) + 1)]
            for r in sorted(recs, key=lambda r: (_series(r) != "fp32", _series(r),
                                                 _col_order(_bits_label(r["config"]["bits"])))):
                t = r["result"]["tasks"]
                cells = [_acc_cell(t[k], t[k].get("metric", TASKS[k][1])) if k in t else "" for k in tasks]
                out.append(f"| {_series(r)} | {_bits_label(r['config']['bits'])} | " + " | ".join(cells) +
                           f" | {100 * r['result']['average']:.1f} |")
            out.append("")
    if foreign:
        out.append(f"({len(foreign)} record(s) not written by `matquant experiment` were skipped: they lack the "
                   "grid fields eval/quant/bits.)")
    return "\n".join(out).rstrip() + "\n"


def _is_grid_record(r: dict) -> bool:
    c = r.get("config", {})
    return all(k in c for k in ("model", "eval", "quant", "bits")) and isinstance(r.get("result"), dict)


def _acc_cell(t: dict, main: str) -> str:
    def f(k):
        v = t.get(k)
        s = "—" if v is None else f"{100 * v:.1f}"
        return f"**{s}**" if k == main else s

    return f"{f('acc')} / {f('acc_norm')}"


def _col_order(label: str):
    if label == "fp32":
        return (0, 0)
    m = re.fullmatch(r"int(\d+)", label)
    return (1, -int(m.group(1))) if m else (2, label)


def plot(records: list[dict], path, kind: str, title: str = "") -> bool:
    """Quality vs effective bits; returns False when there is nothing to plot."""
    from matquant.eval.plot import plot_quality_vs_bits

    recs = [r for r in _latest(records) if _is_grid_record(r) and r["config"]["eval"] == kind]
    if not recs:
        return False
    val = (lambda r: r["result"]["ppl"]) if kind == "ppl" else (lambda r: 100 * r["result"]["average"])
    ref = [val(r) for r in recs if r["config"]["quant"] is None]
    series, mnm = defaultdict(list), defaultdict(list)
    for r in recs:
        if r["config"]["quant"] is None:
            continue
        pt = (r["result"]["effective_bits"], val(r))
        (mnm if isinstance(r["config"]["bits"], dict) else series)[_series(r)].append(pt)
    if not series and not mnm:
        return False
    plot_quality_vs_bits(series, path, mixnmatch=mnm, frontier=True, higher_is_better=kind != "ppl",
                         ref=ref[0] if ref else None, log_y=kind == "ppl", title=title,
                         xlabel="effective bits per quantized weight",
                         ylabel="perplexity (log scale, lower is better)" if kind == "ppl"
                         else "zero-shot task average, % (higher is better)")
    return True


BEGIN = "<!-- matquant-experiment {name}: begin (generated by `matquant experiment`; edits are overwritten) -->"
END = "<!-- matquant-experiment {name}: end -->"


def update_marked_section(path, name: str, text: str) -> None:
    """Replace (or append) the generated section `name` of a markdown file, atomically."""
    p = Path(path)
    old = p.read_text(encoding="utf-8") if p.exists() else ""
    b, e = BEGIN.format(name=name), END.format(name=name)
    block = f"{b}\n{text.rstrip()}\n{e}"
    if b in old and e in old:
        new = old[:old.index(b)] + block + old[old.index(e) + len(e):]
    else:
        new = old.rstrip() + ("\n\n" if old.strip() else "") + block + "\n"
    atomic_write_text(p, new)


def write_report(store: ResultStore, out, name: str = "results", docs=None) -> dict:
    """results.md + ppl_vs_bits.png + zeroshot_vs_bits.png into `out` (and the section `name` of `docs`)."""
    out = Path(out)
    recs = store.records()
    tables = build_tables(recs)
    files = {}
    for kind, fname in (("ppl", "ppl_vs_bits.png"), ("zeroshot", "zeroshot_vs_bits.png")):
        if plot(recs, out / fname, kind, title=f"{name}: {'perplexity' if kind == 'ppl' else 'zero-shot avg'}"):
            files[kind] = out / fname
    imgs = "".join(f"\n![{k}]({f.name})\n" for k, f in files.items())
    atomic_write_text(out / "results.md", f"# {name}\n\n{tables}{imgs}")
    files["md"] = out / "results.md"
    if docs is not None:
        base = Path(docs).parent.resolve()
        rel = "".join(f"\n![{k}]({os.path.relpath(f.resolve(), base)})\n" for k, f in files.items() if k != "md")
        update_marked_section(docs, name, f"## {name}\n\n{tables}{rel}")
    return files
