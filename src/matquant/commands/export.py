"""matquant export: write one slice (or a Mix'n'Match bits map) of a checkpoint as a plain HF model (hf), GGUF
(llama.cpp) or compressed-tensors (vLLM), exactly where the format can hold it. `matquant slice` is the old spelling
of `--format hf` (same flags). See docs/export.md."""
from __future__ import annotations

from matquant.commands.common import add_slice_args, load_bits_map

FORMATS = ("hf", "gguf", "compressed-tensors")
DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_DTYPE = {"hf": "float32", "compressed-tensors": "float16"}


def register(sub) -> None:
    p = sub.add_parser("export", help="export a slice or bits map as a plain HF model, GGUF (llama.cpp) or "
                                      "compressed-tensors (vLLM)",
                       description="Write the r-bit slice (--bits) or a per-layer bits map (--bits-map) of a matquant "
                                   "checkpoint in a format other software loads: hf (a plain HF model folder, weights "
                                   "dequantized to --dtype, that stock transformers loads without matquant), gguf (one "
                                   "file, per-tensor GGML types, built on a template GGUF of the same model or on the "
                                   "checkpoint's own config and tokenizer) or "
                                   "compressed-tensors (pack-quantized folder as llm-compressor writes it). Exact where "
                                   "the format can hold the slice, nearest otherwise; the weight error is reported. "
                                   "docs/export.md.")
    add_slice_args(p, "matquant checkpoint folder (with its tokenizer)")
    p.add_argument("--format", required=True, choices=FORMATS, help="output format")
    p.add_argument("--out", required=True, help="output folder (hf, compressed-tensors) or .gguf file (gguf)")
    p.add_argument("--template", metavar="GGUF", default=None,
                   help="gguf: GGUF of the same model supplying metadata, tokenizer and the non-quantized tensors "
                        "(default: the embedded SmolLM2-135M's shipped GGUF for a checkpoint of that model; for any "
                        "other model, or with 'none', metadata and tokenizer are written from the checkpoint's "
                        "config and tokenizer: llama and qwen2 models)")
    p.add_argument("--k-quants", action="store_true",
                   help="gguf: where the rows are divisible by 256, write 2/4/5-bit slices as Q2_K/Q4_K/Q5_K (the "
                        "slice's own codes, sub-block scales and mins fitted to its values) and 3/6-bit slices as "
                        "Q3_K/Q6_K (nearest), smaller than Q4_1/Q5_1 (exact) / Q8_0 (docs/export.md)")
    p.add_argument("--pack-bits", type=int, default=None, metavar="N",
                   help="compressed-tensors: store r-bit slices in N-bit codes (N > r shrinks the integer-zero-point "
                        "error; 4 and 8 are the widths vLLM's WNA16 kernels take)")
    p.add_argument("--dtype", default=None, choices=DTYPES,
                   help="hf: dtype of the dequantized weights (default float32); compressed-tensors: dtype of the "
                        "scales and the non-quantized tensors (default float16: holds our fp16 scales exactly); "
                        "gguf: not used (the GGML types are chosen per tensor)")
    p.add_argument("--zero-fit", default="search", choices=("search", "lsq"),
                   help="compressed-tensors: how the integer-zero-point grid is fitted to the slice where it cannot "
                        "hold it exactly: search = best of candidate grids around the slice's scale (default); lsq = "
                        "then a least-squares refit of scale and codes (lower weight rms, worse perplexity: "
                        "docs/export.md)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=run)
    register_slice_alias(sub)


def register_slice_alias(sub) -> None:
    """`matquant slice`: `matquant export --format hf` under its old name, with its old flags."""
    p = sub.add_parser("slice", help="export one precision as a standalone (dequantized) HF model "
                                     "(= export --format hf)",
                       description="Write the r-bit slice (or a per-layer bits map) of a checkpoint as a plain HF "
                                   "model folder that stock transformers loads (weights dequantized to --dtype). "
                                   "The same as `matquant export --format hf`.")
    add_slice_args(p)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=run, format="hf", template=None, k_quants=False, pack_bits=None, zero_fit="search")


def run(args) -> int:
    if args.bits is not None and not 1 <= args.bits <= 8:
        raise ValueError(f"--bits must be in 1..8, got {args.bits}")
    from matquant.integrations.export_slices import check_out_path

    check_out_path(args.out, args.overwrite)  # fail before loading anything
    if args.format != "gguf" and (args.template or args.k_quants):
        raise ValueError("--template and --k-quants apply to --format gguf only.")
    if args.format != "compressed-tensors" and (args.pack_bits or args.zero_fit != "search"):
        raise ValueError("--pack-bits and --zero-fit apply to --format compressed-tensors only.")
    if args.pack_bits is not None and not 1 <= args.pack_bits <= 8:
        raise ValueError(f"--pack-bits must be in 1..8, got {args.pack_bits}")
    import torch

    bits = args.bits if args.bits is not None else load_bits_map(args.bits_map)
    dtype = args.dtype or DEFAULT_DTYPE.get(args.format)
    from matquant.integrations.export_slices import CheckpointSource

    if args.format == "hf":  # a plain HF folder of the slice (a checkpoint without a tokenizer is written without one)
        from matquant.format.export import export_dequantized

        with CheckpointSource(args.checkpoint, bits, args.slicing, need_tokenizer=False) as src:
            export_dequantized(src, None, args.out, dtype=getattr(torch, dtype), overwrite=args.overwrite,
                               max_shard_bytes=src.out_shard_bytes())
            slicing = args.slicing or src.qconfig.slicing
        what = f"int{args.bits}" if args.bits is not None else f"bits map {args.bits_map}"
        print(f"wrote {args.out}: {what} ({slicing} slicing), {dtype}; "
              f"load with AutoModelForCausalLM.from_pretrained({args.out!r})")
        return 0
    with CheckpointSource(args.checkpoint, bits, args.slicing) as src:  # read one tensor at a time
        qcfg = src.qconfig
        what = {"checkpoint": str(args.checkpoint), "bits": args.bits, "bits_map": args.bits_map,
                "slicing": args.slicing or qcfg.slicing, "method": qcfg.method, "group_size": qcfg.group_size}
        if args.format == "gguf":
            from matquant.integrations.gguf_export import export_gguf

            rep = export_gguf(src, None, args.out, template=args.template, k_quants=args.k_quants,
                              overwrite=args.overwrite, metadata=what)
            print(rep.summary())
            print(f"serve: llama-cli -m {args.out}   |   read back: AutoModelForCausalLM.from_pretrained(DIR, "
                  "gguf_file=NAME)")
        else:
            from matquant.integrations.compressed_tensors_export import export_compressed_tensors

            rep = export_compressed_tensors(src, None, args.out, dtype=getattr(torch, dtype),
                                            pack_bits=args.pack_bits, overwrite=args.overwrite, fit=args.zero_fit)
            print(rep.summary())
            print(f"serve: vllm serve {args.out}   |   read back: AutoModelForCausalLM.from_pretrained({args.out!r})")
    return 0
