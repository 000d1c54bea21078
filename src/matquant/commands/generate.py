"""matquant generate: stream text from one slice of a checkpoint (or the full-precision model) and report
prefill / decode speed and the process's resident memory."""
from __future__ import annotations

import time

from matquant.commands.common import load_bits_map


EMBEDDING_CHOICES = ("int8", "fp32")
DEFAULT_CHECKPOINT_EMBEDDINGS = "int8"


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a checkpoint slice on the packed CPU runtime",
                       description="Stream tokens from the r-bit slice (or a bits map, or the best map within a "
                                   "memory budget) of a matquant checkpoint, then print prefill and decode tokens/s "
                                   "and the process RSS. --model runs a full-precision model instead, to compare.")
    p.add_argument("checkpoint", nargs="?", help="matquant checkpoint folder (omit with --model)")
    p.add_argument("--model", default=None, metavar="SPEC",
                   help="run a full-precision model instead (e.g. smollm2-135m, a HF folder or a .gguf file)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--bits", type=int, default=None, help="precision of every quantized layer (default: the "
                                                          "checkpoint's default)")
    g.add_argument("--bits-map", metavar="JSON", default=None, help="per-layer bits map (JSON file)")
    g.add_argument("--budget", default=None, metavar="SIZE",
                   help="resident-memory budget, e.g. 100MB: loads the pyramid int4/int8 map that fits "
                        "(see docs/runtime.md); implies --drop-master")
    p.add_argument("--slicing", default=None, choices=("paper", "nested", "extra"),
                   help="slicing mode (default: the checkpoint's)")
    p.add_argument("--prompt", required=True, help="the prompt (a chat template is applied for instruct models)")
    p.add_argument("--no-chat", action="store_true", help="use the prompt as raw text even if a chat template exists")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="random seed for sampling")
    p.add_argument("--backend", default="auto", choices=("auto", "packed", "cpu", "torch"),
                   help="compute path of the quantized layers (default auto = the packed int4 runtime on CPU)")
    p.add_argument("--drop-master", action="store_true",
                   help="free the uint8 master codes after packing (the int4 model then holds ~4.5 bits/weight)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="dtype of the unquantized parts (embeddings, norms) and activations (default float32)")
    p.add_argument("--embeddings", default=None, choices=EMBEDDING_CHOICES,
                   help="token embedding and output head: int8 (one per-row int8 table, shared when tied; the "
                        "default for checkpoints) or fp32 (unquantized, in --dtype; the default with --model). "
                        "docs/runtime.md")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the forward with a static KV cache: faster decode on CPU after a first "
                        "call that compiles ( the generation that compiles is run once as a warm-up "
                        "and not timed). docs/runtime.md")
    p.add_argument("--debug", action="store_true")
    p.set_defaults(func=run)


def _trim_heap() -> None:
    """Return freed heap pages to the OS (glibc), so RSS after loading shows what is held, not allocator slack."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def load_for_generation(args):
    """(model, tokenizer, description) for the arguments of `matquant generate`."""
    import torch

    dtype = getattr(torch, args.dtype)
    if args.model is not None:
        if args.checkpoint is not None:
            raise ValueError("give either a checkpoint folder or --model, not both.")
        if args.bits is not None or args.bits_map or args.budget:
            raise ValueError("--bits/--bits-map/--budget apply to matquant checkpoints, not to --model.")
        from matquant.models.loading import load_model

        model, tok, src = load_model(args.model, dtype=dtype)
        what = f"{src.describe()} ({args.dtype}, full precision)"
        if args.embeddings == "int8":
            from matquant.nn.quantized_embedding import quantize_embeddings

            quantize_embeddings(model)
            what += ", int8 embeddings and head"
        return model.eval(), tok, what
    if args.checkpoint is None:
        raise ValueError("give a matquant checkpoint folder, or --model SPEC for a full-precision model.")
    import matquant
    from matquant.nn.bits import average_bits

    bits = args.bits if args.bits is not None else load_bits_map(args.bits_map)
    embeddings = args.embeddings or DEFAULT_CHECKPOINT_EMBEDDINGS
    model, tok = matquant.load(args.checkpoint, bits=bits, slicing=args.slicing, dtype=dtype, backend=args.backend,
                               keep_master=False if (args.drop_master or args.budget) else True,
                               budget=args.budget, quantize_embeddings=embeddings == "int8")
    what = f"{args.checkpoint} at {average_bits(model):.2f} average bits, {embeddings} embeddings and head"
    if args.budget:
        from matquant.mixnmatch.runtime_fit import describe

        b = model.matquant_budget
        what += (f" (budget {args.budget}: {describe(b['bits_map'])}; resident "
                 f"{b['measured_bytes'] / 2**20:.1f} MiB)")
    return model.eval(), tok, what + f", backend {args.backend}"


def build_inputs(tok, prompt: str, chat: bool = True):
    if chat and getattr(tok, "chat_template", None):
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)
        return ids["input_ids"], ids.get("attention_mask")
    enc = tok(prompt, return_tensors="pt")
    return enc["input_ids"], enc.get("attention_mask")


class TimingStreamer:
    """Wraps a transformers streamer; records when the prompt was consumed and when each new token arrived."""

    def __init__(self, inner=None):
        self.inner = inner
        self.times: list[float] = []
        self.calls = 0

    def put(self, value):
        self.calls += 1
        if self.calls > 1:  # the first call is the prompt
            self.times.append(time.perf_counter())
        if self.inner is not None:
            self.inner.put(value)

    def end(self):
        if self.inner is not None:
            self.inner.end()


def generate(model, tok, input_ids, attention_mask=None, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, stream: bool = True) -> dict:
    """Run generation; returns tokens, text and timing (prefill = prompt → first new token)."""
    import torch
    from transformers import TextStreamer

    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {max_new_tokens}.")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError("--temperature must be >= 0 and --top-p in (0, 1].")
    torch.manual_seed(seed)
    streamer = TimingStreamer(TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if stream else None)
    kw = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, streamer=streamer,
              pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    if temperature > 0:
        kw.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=attention_mask, **kw)
    t_end = time.perf_counter()
    new = out[0, input_ids.shape[1]:]
    times = streamer.times or [t_end]
    n_prompt, n_new = input_ids.shape[1], len(new)
    prefill_s = times[0] - t0
    decode_s = times[-1] - times[0]
    return {"prompt_tokens": n_prompt, "new_tokens": n_new, "text": tok.decode(new, skip_special_tokens=True),
            "prefill_s": prefill_s, "decode_s": decode_s,
            "prefill_tok_s": n_prompt / prefill_s if prefill_s > 0 else float("nan"),
            "decode_tok_s": (n_new - 1) / decode_s if n_new > 1 and decode_s > 0 else float("nan")}


def run(args) -> int:
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}.")
        torch.set_num_threads(args.threads)
    model, tok, what = load_for_generation(args)
    if tok is None:
        raise ValueError("this checkpoint has no tokenizer files; re-create it with `matquant quantize`.")
    _trim_heap()
    rss_load = _rss_mib()
    ids, mask = build_inputs(tok, args.prompt, chat=not args.no_chat)
    if args.compile:
        from matquant.nn.compiled import compile_decode

        compile_decode(model)
        t0 = time.perf_counter()
        print("compiling (first generation, not shown) ...", flush=True)
        generate(model, tok, ids, mask, args.max_new_tokens, args.temperature, args.top_p, args.seed, stream=False)
        print(f"compiled in {time.perf_counter() - t0:.0f} s", flush=True)
    r = generate(model, tok, ids, mask, args.max_new_tokens, args.temperature, args.top_p, args.seed)
    print()
    from matquant.nn.memory import describe_resident, resident_bytes_by_part

    print(f"model: {what}")
    print(describe_resident(resident_bytes_by_part(model)))
    print(f"prefill: {r['prompt_tokens']} tokens, {r['prefill_tok_s']:.1f} tok/s | decode: {r['new_tokens']} "
          f"tokens, {r['decode_tok_s']:.1f} tok/s | RSS after load {rss_load:.0f} MiB, after generation "
          f"{_rss_mib():.0f} MiB | {torch.get_num_threads()} threads{' | compiled' if args.compile else ''}")
    return 0
