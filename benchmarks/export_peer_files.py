"""Build the peer GGUF files of the export comparison (issue 13): llama.cpp's own quantizations of the fp32
reference, with and without an importance matrix, in two scopes.

- scope ``all``: llama-quantize's own mixture for the type (FFN and attention quantized, as llama.cpp users get it).
- scope ``ffn``: like our FFN-only slices: the FFN tensors get the type, the attention projections are forced to
  Q4_1 (on this model that recovers the reference's own blocks exactly: the fp32 reference is a dequantized Q4_1,
  and it is what our FFN-only exports carry from the template) and the token embedding stays Q8_0 (as in ours).
- ``-im``: ``llama-imatrix`` on the ``calib`` text (disjoint from the ``eval`` text by construction, see
  matquant.data.text), 32 chunks of 512 tokens (the size of matquant's default MatGPTQ calibration).

    python benchmarks/export_peer_files.py --ref /work/artifacts/export/peer/ref-f32.gguf \
        --out-dir /work/artifacts/export13/peer Q8_0:all Q3_K_M:all Q4_0:ffn:im ...

Then score them with benchmarks/bench_export_peer.py (same reader and windows as every other row).
"""
from __future__ import annotations

import argparse
import subprocess
from pathlib import Path

BIN = "/work/llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin"
ATTN = ("attn_q", "attn_k", "attn_v", "attn_output")


def make_imatrix(binary: Path, ref: Path, out_dir: Path, chunks: int, ctx: int, threads: int) -> Path:
    from matquant.data.text import get_text

    out = out_dir / f"imatrix-calib-{chunks}x{ctx}.gguf"
    if out.exists():
        return out
    text = out_dir / "calib.txt"
    text.write_text(get_text("calib"))
    tmp = out.with_suffix(".tmp.gguf")
    with open(out_dir / "imatrix.log", "w") as log:
        subprocess.run([str(binary / "llama-imatrix"), "-m", str(ref), "-f", str(text), "-c", str(ctx),
                        "--chunks", str(chunks), "-t", str(threads), "-o", str(tmp)],
                       stdout=log, stderr=subprocess.STDOUT, check=True)
    tmp.rename(out)
    return out


def quantize(binary: Path, ref: Path, out_dir: Path, qtype: str, scope: str, imatrix: Path | None,
             threads: int) -> Path:
    out = out_dir / f"ref-{scope}-{qtype}{'-im' if imatrix else ''}.gguf"
    if out.exists():
        return out
    cmd = [str(binary / "llama-quantize")]
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
    p.add_argument("--out-dir", required=True)
    p.add_argument("--bin", default=BIN)
    p.add_argument("--imatrix-chunks", type=int, default=32)
    p.add_argument("--imatrix-ctx", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    binary, ref, out_dir = Path(a.bin), Path(a.ref), Path(a.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    imatrix = None
    for spec in a.specs:
        parts = spec.split(":")
        if len(parts) not in (2, 3) or parts[1] not in ("all", "ffn") or parts[2:] not in ([], ["im"]):
            raise SystemExit(f"bad spec {spec!r}: use TYPE:all|ffn[:im], e.g. Q4_0:ffn:im")
        im = None
        if parts[2:] == ["im"]:
            imatrix = imatrix or make_imatrix(binary, ref, out_dir, a.imatrix_chunks, a.imatrix_ctx, a.threads)
            im = imatrix
        print(quantize(binary, ref, out_dir, parts[0], parts[1], im, a.threads), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
