"""matquant export: write one slice (or a Mix'n'Match bits map) of a checkpoint as GGUF (llama.cpp) or
compressed-tensors (vLLM), exactly where the format can hold it. See docs/export.md."""
from __future__ import annotations

from matquant.commands.common import add_slice_args, load_bits_map

FORMATS = ("gguf", "compressed-tensors")


def register(sub) -> None:
    p = sub.add_parser("export", help="export a slice or bits map as GGUF (llama.cpp) or compressed-tensors (vLLM)",
                       description="Write the r-bit slice (--bits) or a per-layer bits map (--bits-map) of a matquant "
                                   "checkpoint in a format an inference engine serves: gguf (one file, per-tensor "
                                   "GGML types, built on a template GGUF of the same model) or compressed-tensors "
                                   "(pack-quantized folder as llm-compressor writes it). Exact where the format can "
                                   "hold the slice, nearest otherwise; the weight error is reported. docs/export.md.")
    add_slice_args(p, "matquant checkpoint folder (with its tokenizer)")
    p.add_argument("--format", required=True, choices=FORMATS, help="output format")
    p.add_argument("--out", required=True, help="output .gguf file (gguf) or folder (compressed-tensors)")
    p.add_argument("--template", metavar="GGUF", default=None,
                   help="gguf: GGUF of the same model supplying metadata, tokenizer and the non-quantized tensors "
                        "(default: the embedded SmolLM2-135M's shipped GGUF)")
    p.add_argument("--k-quants", action="store_true",
                   help="gguf: write 6/3/2-bit slices as Q6_K/Q3_K/Q2_K (nearest, smaller) where the rows are "
                        "divisible by 256, instead of Q8_0 (nearest) / Q4_1 (exact)")
    p.add_argument("--pack-bits", type=int, default=None, metavar="N",
                   help="compressed-tensors: store r-bit slices in N-bit codes (N > r shrinks the integer-zero-point "
                        "error; 4 and 8 are the widths vLLM's WNA16 kernels take)")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                   help="compressed-tensors: dtype of the scales and the non-quantized tensors (default float16: "
                        "holds our fp16 scales exactly)")
    p.add_argument("--zero-fit", default="search", choices=("search", "lsq"),
                   help="compressed-tensors: how the integer-zero-point grid is fitted to the slice where it cannot "
                        "hold it exactly: search = best of candidate grids around the slice's scale (default); lsq = "
                        "then a least-squares refit of scale and codes (lower weight rms, measured worse perplexity: "
                        "docs/export.md)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.bits is not None and not 1 <= args.bits <= 8:
        raise ValueError(f"--bits must be in 1..8, got {args.bits}")
    from matquant.integrations.export_slices import check_out_path, load_for_export

    check_out_path(args.out, args.overwrite)  # fail before loading anything
    if args.format != "gguf" and (args.template or args.k_quants):
        raise ValueError("--template and --k-quants apply to --format gguf only.")
    if args.format == "gguf" and (args.pack_bits or args.zero_fit != "search"):
        raise ValueError("--pack-bits and --zero-fit apply to --format compressed-tensors only.")
    if args.pack_bits is not None and not 1 <= args.pack_bits <= 8:
        raise ValueError(f"--pack-bits must be in 1..8, got {args.pack_bits}")
    bits = args.bits if args.bits is not None else load_bits_map(args.bits_map)
    model, tok, qcfg = load_for_export(args.checkpoint, bits, args.slicing)
    what = {"checkpoint": str(args.checkpoint), "bits": args.bits, "bits_map": args.bits_map,
            "slicing": args.slicing or qcfg.slicing, "method": qcfg.method, "group_size": qcfg.group_size}
    if args.format == "gguf":
        from matquant.integrations.gguf_export import export_gguf

        rep = export_gguf(model, tok, args.out, template=args.template, k_quants=args.k_quants,
                          overwrite=args.overwrite, metadata=what)
        print(rep.summary())
        print(f"serve: llama-cli -m {args.out}   |   read back: AutoModelForCausalLM.from_pretrained(DIR, gguf_file=NAME)")
    else:
        from matquant.integrations.compressed_tensors_export import export_compressed_tensors

        import torch

        rep = export_compressed_tensors(model, tok, args.out, dtype=getattr(torch, args.dtype),
                                        pack_bits=args.pack_bits, overwrite=args.overwrite, fit=args.zero_fit)
        print(rep.summary())
        print(f"serve: vllm serve {args.out}   |   read back: AutoModelForCausalLM.from_pretrained({args.out!r})")
    return 0
