"""Evaluate every requested (precision, slicing mode) of one loaded checkpoint, switching in place."""
from __future__ import annotations

from tqdm.auto import tqdm

from matquant.eval.perplexity import perplexity
from matquant.nn.bits import effective_bits, get_bits, matquant_modules, set_bits


def slice_jobs(model, bits_list, modes, bits_map=None) -> tuple[int, list[tuple]]:
    """(master bits, [(bits, mode)]) of a grid: the r == master slice is the same in every mode and is listed once
    (first mode); with `bits_map`, one ("map", mode) job per mode."""
    master = max(m.master_bits for m in matquant_modules(model).values())
    jobs = [(b, mode) for b in bits_list for mode in (modes if b < master else modes[:1])]
    return master, jobs + ([("map", mode) for mode in modes] if bits_map else [])


def ppl_grid(model, windows, bits_list, modes, bits_map=None, batch_size: int = 1,
             progress: bool = True) -> list[dict]:
    """One row per (bits, mode): {"bits", "slicing", "ppl", "effective_bits", "tokens", ...}.

    The r == master row is the same in every mode and is evaluated once. With `bits_map`, one extra row per
    mode ("bits": "map") evaluates that per-layer map.
    """
    saved = get_bits(model)
    master, jobs = slice_jobs(model, bits_list, modes, bits_map)
    rows = []
    bar = tqdm(jobs, desc="slices", disable=not progress)
    for b, mode in bar:
        bar.set_postfix_str(f"int{b} {mode}" if b != "map" else f"bits map {mode}")
        set_bits(model, bits_map if b == "map" else b, mode)
        r = perplexity(model, windows, batch_size=batch_size, progress=progress, desc=f"ppl int{b} {mode}")
        rows.append({"bits": b, "slicing": mode if b != master else "any", "ppl": r.ppl, "nll": r.nll,
                     "effective_bits": round(effective_bits(model), 4), "tokens": r.tokens, "seqlen": r.seqlen})
    set_bits(model, saved)
    return rows
