"""What would a per-slice scale/offset buy? A probe, not a feature (issue 14, after the clipping-search grids).

One checkpoint's r-bit slice reads its codes with the master's (α, z). Dedicated GPTQ with the clipping search for
its own precision is far better at int3/int2 than any one-checkpoint slice (docs/results.md, "Clipping search for
every method"), and the nested codes themselves are fixed by the master. This script keeps every slice's codes and
re-solves only how they are read back, per slice, by least squares on the calibration output error
‖(W − Ŵ'_r)X‖² (full H = XᵀX of the fp32 model's inputs, 1 % damping):

- `row`:   Ŵ'_r = γ·Ŵ_r + β per output row and slice (one fp16 pair per row: ~0.02-0.06 bits/weight per slice);
- `group`: Ŵ'_r = γ_g·Ŵ_r + β_g per (row, group) and slice = a slice-own (α_r, z_r) per group (+0.5 bits/weight per
  slice at g64, fp16).

Both keep the slice a bit prefix of the int8 codes, and both are still one affine map per block, so an exporter
could fold them into its block scales (Q4_1 d/m). The `group` variant became a real option after this probe:
`--slice-params own` (gptq / matgptq; docs/results.md, "Slice-own group parameters"); `row` did not. The evaluation is fake-quant
(the corrected dense weights in a copy of the fp32 model), same windows as the grids.

    OMP_NUM_THREADS=1 PYTHONPATH=src python lab/benchmarks/slice_affine_probe.py --out lab/results/slice_affine.json
        [--checkpoint CKPT]   # default: quantize with --recipe quality into WORK/probe_quality

WORK is the work folder (--work, else $MATQUANT_WORK, else ./matquant-work; lab/benchmarks/_paths.py).
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _paths import add_work_option, work_path  # noqa: E402


def hessians(model, names: list[str], calib: torch.Tensor) -> dict[str, torch.Tensor]:
    """{name: XᵀX / tokens} of each target's inputs over the calibration windows (fp32 model)."""
    mods = dict(model.named_modules())
    acc: dict[str, list] = {n: [0, 0] for n in names}

    def hook(n):
        def fn(_m, inp):
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
            acc[n][0] = acc[n][0] + x.T @ x
            acc[n][1] += x.shape[0]
        return fn
    hs = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for i in range(calib.shape[0]):
                model(calib[i:i + 1], use_cache=False)
    finally:
        for h in hs:
            h.remove()
    return {n: s / c for n, (s, c) in acc.items()}


def affine_fit(W: torch.Tensor, Wq: torch.Tensor, H: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Ŵ' = γ·Ŵ + β per row (group_size None) or per (row, group), minimising (w − ŵ')ᵀH(w − ŵ') row by row:
    per row a 2G × 2G normal system in (γ_1..γ_G, β_1..β_G), built blockwise (no dense design matrix)."""
    n_out, n_in = W.shape
    H = H + 0.01 * H.diagonal().mean() * torch.eye(n_in)
    gs = n_in if group_size is None else group_size
    G = n_in // gs
    Hb = H.reshape(G, gs, G, gs)
    Q = Wq.reshape(n_out, G, gs)
    Hsum = Hb.sum(3)  # [G, gs, G]: Σ over the second group's columns
    m_ww = torch.einsum("ogi,gihj,ohj->ogh", Q, Hb, Q)
    m_w1 = torch.einsum("ogi,gih->ogh", Q, Hsum)  # ŵ_g · H · 1_h
    m_11 = Hsum.sum(1)  # [G, G]
    M = torch.cat([torch.cat([m_ww, m_w1], 2),
                   torch.cat([m_w1.transpose(1, 2), m_11.expand(n_out, G, G)], 2)], 1)
    HW = (W @ H).reshape(n_out, G, gs)
    rhs = torch.cat([(Q * HW).sum(2), HW.sum(2)], 1)
    c = torch.linalg.solve(M + 1e-9 * torch.eye(2 * G), rhs)
    out = (c[:, :G, None] * Q + c[:, G:, None]).reshape(n_out, n_in)

    def err(D):
        return ((D @ H) * D).sum(1)
    return torch.where((err(W - out) < err(W - Wq))[:, None], out, Wq)  # a row only moves when its error drops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=None, help="a matquant checkpoint of --model (default: make one)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--recipe", default="quality", help="recipe for the checkpoint made when none is given")
    ap.add_argument("--bits", default="4,3,2")
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", required=True)
    add_work_option(ap, "the checkpoint made when none is given (WORK/probe_RECIPE)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import matquant
    from matquant.data import token_windows
    from matquant.eval.perplexity import perplexity
    from matquant.format.checkpoint import load_checkpoint
    from matquant.models import load_model
    from matquant.nn.bits import set_bits

    t0 = time.time()
    ck = a.checkpoint or str(work_path(f"probe_{a.recipe}", work=a.work))
    if not Path(ck, "config.json").exists():
        matquant.quantize(a.model, out=ck, recipe=a.recipe, overwrite=True)
    print(f"checkpoint {ck} ({time.time() - t0:.0f} s)", flush=True)
    src, tok, _ = load_model(a.model)
    src.eval()
    qm, _, _ = load_checkpoint(ck)
    qmods = {n: m for n, m in qm.named_modules() if hasattr(m, "dense_weight")}
    t1 = time.time()
    H = hessians(src, list(qmods), token_windows(tok, "calib", 512, 32))
    print(f"{len(H)} Hessians in {time.time() - t1:.0f} s", flush=True)
    windows = token_windows(tok, "eval", 2048, a.windows)
    fp = perplexity(src, windows, desc="fp32").ppl
    rows = {"checkpoint": ck, "fp32": fp, "windows": a.windows, "results": []}
    src_w = {n: m.weight for n, m in src.named_modules() if n in qmods}
    for bits in [int(b) for b in a.bits.split(",")]:
        set_bits(qm, bits, "nested")
        for variant in ("stored", "row", "group"):
            t2 = time.time()
            fake = copy.deepcopy(src)
            fmods = dict(fake.named_modules())
            with torch.no_grad():
                for n, m in qmods.items():
                    Wq = m.dense_weight(torch.float32)
                    if variant != "stored":
                        Wq = affine_fit(src_w[n].float(), Wq, H[n], None if variant == "row" else m.group_size)
                    fmods[n].weight.copy_(Wq)
            fit_s = time.time() - t2
            p = perplexity(fake, windows, desc=f"int{bits} {variant}").ppl
            rows["results"].append({"bits": bits, "variant": variant, "ppl": p, "ratio": p / fp, "fit_s": fit_s})
            print(f"int{bits} {variant}: {p:.3f} ({p / fp:.3f}x), fit {fit_s:.0f} s", flush=True)
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
            Path(a.out).write_text(json.dumps(rows, indent=1))
            del fake


if __name__ == "__main__":
    main()
