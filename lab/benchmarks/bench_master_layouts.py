"""The two packed layouts of the master codes side by side, on one thread: the int4-kernel planes
(`kernels.master_planes.MasterPlanes`, kept) and the chunked 2|2|4 planes (`kernels/packing.py` `PackedCodes`,
removed in issue 25 by this measurement; its packing and unpacking are reproduced below, unchanged).

For each SmolLM2-sized layer shape and each nested precision r it times, per layer:

- switch   building the r-bit slice the packed CPU runtime runs from the held master (the work of the first
           forward after `set_bits`): MasterPlanes: `nested_slice` (at most one AND); PackedCodes: unpack the
           leading planes the slice needs and pack them for the int4 kernel (`pack_slice`); uint8 codes (context):
           `pack_slice` from the unpacked master.
- forward  one batch-1 and one batch-32 matmul on the resulting slice (both layouts give byte-identical slices,
           checked), and the dense path that reads PackedCodes on CPU (unpack + `cpu.dequantize` + F.linear),
           what a PackedCodes master costs on CPU without the int4 kernel.

Usage: python lab/benchmarks/bench_master_layouts.py [--repeats 30] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from matquant.kernels import cpu, cpu_packed, master_planes
from matquant.quant.minmax import quantize_minmax

CHUNKS = (2, 2, 4)


def planes_needed(chunks, bits: int) -> int:
    """Leading planes a nested r-bit slice reads."""
    covered = 0
    for p, w in enumerate(chunks):
        covered += w
        if covered >= bits:
            return p + 1
    return len(chunks)


def pack_codes(codes: torch.Tensor, chunks=CHUNKS) -> list[torch.Tensor]:
    """uint8 codes [out, in] (in % 8 == 0) as most-significant-first chunk planes, 8/w values per byte."""
    n, k = codes.shape
    q, planes, shift = codes.to(torch.int32), [], 8
    for w in chunks:
        shift -= w
        per = 8 // w
        vals = ((q >> shift) & ((1 << w) - 1)).view(n, k // per, per)
        planes.append((vals << (torch.arange(per, dtype=torch.int32) * w)).sum(-1).to(torch.uint8))
    return planes


def unpack_planes(planes: list[torch.Tensor], n_planes: int, chunks=CHUNKS) -> torch.Tensor:
    """The top bits covered by the first `n_planes` planes, as uint8 [out, in]."""
    t = None
    for p in range(n_planes):
        w, b = chunks[p], planes[p]
        per, mask = 8 // w, (1 << w) - 1
        vals = b if per == 1 else torch.stack([(b >> (j * w)) & mask for j in range(per)], -1).reshape(b.shape[0], -1)
        t = vals if t is None else (t << w) | vals
    return t


SHAPES = [(1536, 576), (576, 1536)]  # (out, in): SmolLM2-135M's up/gate and down projections
BITS = (2, 3, 4, 6, 8)
GROUP = 64


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return 1e3 * times[len(times) // 2]


def slice_from_chunks(pc, scales, zeros, bits):
    """The packed runtime's nested r-bit slice built from a PackedCodes master (only the planes it needs)."""
    n_planes = planes_needed(CHUNKS, bits)
    covered = sum(CHUNKS[:n_planes])
    top = unpack_planes(pc, n_planes) << (8 - covered)  # the top `covered` bits in place, lower bits 0
    return cpu_packed.pack_slice(top, scales, zeros, 8, bits, "nested", GROUP)


def same(a, b) -> bool:
    return all(torch.equal(pa, pb) and torch.equal(sa, sb) for (pa, sa), (pb, sb) in zip(a.parts, b.parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for out_f, in_f in SHAPES:
        qw = quantize_minmax(torch.randn(out_f, in_f, generator=gen) * 0.05, 8, GROUP)
        s, z = qw.scales, qw.zeros
        planes = master_planes.pack_master(qw.codes, 8)
        chunked = pack_codes(qw.codes)
        assert torch.equal(unpack_planes(chunked, len(CHUNKS)), qw.codes)
        x1 = torch.randn(1, in_f, generator=gen)
        x32 = torch.randn(32, in_f, generator=gen)
        prev = master_planes.nested_slice(planes, s, z, 8, GROUP)
        for r in BITS:
            a = master_planes.nested_slice(planes, s, z, r, GROUP, like=prev)
            b = slice_from_chunks(chunked, s, z, r)
            assert same(a, b), f"layouts disagree at int{r}"
            row = {
                "shape": f"{out_f}x{in_f}", "bits": r,
                "switch_planes_ms": median_ms(lambda: master_planes.nested_slice(planes, s, z, r, GROUP, like=prev),
                                              args.repeats),
                "switch_chunks_ms": median_ms(lambda: slice_from_chunks(chunked, s, z, r), args.repeats),
                "switch_uint8_ms": median_ms(lambda: cpu_packed.pack_slice(qw.codes, s, z, 8, r, "nested", GROUP),
                                             args.repeats),
                "forward_b1_ms": median_ms(lambda: cpu_packed.linear(x1, a), args.repeats * 4),
                "forward_b32_ms": median_ms(lambda: cpu_packed.linear(x32, a), args.repeats),
                "dense_from_chunks_b1_ms": median_ms(
                    lambda: F.linear(x1, cpu.dequantize(unpack_planes(chunked, planes_needed(CHUNKS, r))
                                                        << (8 - sum(CHUNKS[:planes_needed(CHUNKS, r)])),
                                                        s, z, 8, r, "nested")), args.repeats),
                "slice_codes_bytes_planes": sum(t.numel() for t, _ in a.parts
                                                if not any(t is p for p in planes.tensors())),
                "slice_codes_bytes_chunks": sum(t.numel() for t, _ in b.parts),
            }
            rows.append(row)
            prev = a
            print(" ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "group": GROUP, "repeats": args.repeats}
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
