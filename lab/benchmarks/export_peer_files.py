"""Build the peer GGUF files of the export comparison (issue 13): llama.cpp's own quantizations of the fp32
reference, with and without an importance matrix, in two scopes.

- scope ``all``: llama-quantize's own mixture for the type (FFN and attention quantized, as llama.cpp users get it).
- scope ``ffn``: like our FFN-only slices: the FFN tensors get the type, the attention projections are forced to
  Q4_1 (on this model that recovers the reference's own blocks exactly: the fp32 reference is a dequantized Q4_1,
  and it is what our FFN-only exports carry from the template) and the token embedding stays Q8_0 (as in ours).
- ``-im``: ``llama-imatrix`` on the ``calib`` text (disjoint from the ``eval`` text by construction, see
  matquant.data.text), 32 chunks of 512 tokens (the size of matquant's default MatGPTQ calibration).

    python lab/benchmarks/export_peer_files.py --ref REF-F32.gguf Q8_0:all Q3_K_M:all Q4_0:ffn:im ...

The files go to --out-dir (default WORK/export/peer; WORK is --work, else $MATQUANT_WORK, else ./matquant-work);
llama-quantize and llama-imatrix come from $MATQUANT_LLAMA_CPP, else PATH (both settings: lab/benchmarks/_paths.py).

Then score them with lab/benchmarks/bench_export_peer.py (same reader and windows as every other row).
"""
from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

from _paths import add_work_option, llama_tool, work_path

ATTN = ("attn_q", "attn_k", "attn_v", "attn_output")


def make_imatrix(ref: Path, out_dir: Path, chunks: int, ctx: int, threads: int) -> Path:
    from matquant.data.text import get_text

    out = out_dir / f"imatrix-calib-{chunks}x{ctx}.gguf"
    if out.exists():
        return out
    text = out_dir / "calib.txt"
    text.write_text(get_text("calib"))
    tmp = out.with_suffix(".tmp.gguf")
    with open(out_dir / "imatrix.log", "w") as log:
        subprocess.run([str(llama_tool("llama-imatrix")), "-m", str(ref), "-f", str(text), "-c", str(ctx),
                        "--chunks", str(chunks), "-t", str(threads), "-o", str(tmp)],
                       stdout=log, stderr=subprocess.STDOUT, check=True)
    tmp.rename(out)
    return out


def quantize(ref: Path, out_dir: Path, qtype: str, scope: str, imatrix: Path | None,
             threads: int) -> Path:
    out = out_dir / f"ref-{scope}-{qtype}{'-im' if imatrix else ''}.gguf"
    if out.exists():
        return out
    cmd = [str(llama_tool("llama-quantize"))]
    if imatrix is not None:
        cmd += ["--imatrix", str(imatrix)]
    if scope == "ffn":
        for name in ATTN:
            cmd += ["--tensor-type", f"{name}=q4_1"]
        cmd += ["--token-embedding-type", "q8_0"]
    tmp = out.with_suffix(".tmp.gguf")
    cmd += [str(ref), str(tmp), qtype, str(threads)]
    with open(out.with_suffix(".log"), "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=True)
    tmp.rename(out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("specs", nargs="+", help="TYPE:SCOPE[:im], SCOPE in all|ffn")
    p.add_argument("--ref", required=True, help="fp32 reference GGUF (convert_hf_to_gguf.py --outtype f32)")
    p.add_argument("--out-dir", default=None, help="default: WORK/export/peer")
    add_work_option(p, "the default --out-dir")
    p.add_argument("--imatrix-chunks", type=int, default=32)
    p.add_argument("--imatrix-ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    ref = Path(a.ref)
    out_dir = Path(a.out_dir) if a.out_dir else work_path("export", "peer", work=a.work)
    llama_tool("llama-quantize")  # fail now with the settings' names
    out_dir.mkdir(parents=True, exist_ok=True)
    imatrix = None
    for spec in a.specs:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or parts[1] not in ("all", "ffn") or parts[2:] not in ([], ["im"]):
            raise SystemExit(f"bad spec {spec!r}: use TYPE:all|ffn[:im], e.g. Q4_0:ffn:im")
        im = None
        if parts[2:] == ["im"]:
            imatrix = imatrix or make_imatrix(ref, out_dir, a.imatrix_chunks, a.imatrix_ctx, a.threads)
            im = imatrix
        print(quantize(ref, out_dir, parts[0], parts[1], im, a.threads), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
