"""Helper process for tests/test_qat*.py (not a test module): QAT on a tiny seeded Llama, optionally under
torchrun (gloo) or killed with SIGKILL after a given step. Writes OUT/rank{R}.safetensors + OUT/rank{R}.json."""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from pathlib import Path

import torch


def tiny_llama(seed: int = 0, dropout: float = 0.0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, attention_dropout=dropout, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def tiny_model_dir(path, seed: int = 0) -> Path:
    """A tiny Llama + character-level tokenizer saved as an HF folder (for CLI tests)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, **{chr(i): i - 31 for i in range(32, 127)}, "\n": 96}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    model = tiny_llama(seed)
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def structured_windows(n: int = 16, seqlen: int = 32, vocab: int = 256, seed: int = 1) -> torch.Tensor:
    """Learnable token windows: arithmetic sequences mod vocab with a per-window start and stride 1..3."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    return (start + stride * torch.arange(seqlen)) % vocab


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--work-dir", default=None)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--kill-at", type=int, default=0, help="SIGKILL this process right after step N")
    p.add_argument("--crash-at", type=int, default=0, help="every rank raises after step N; then rerun in-process")
    p.add_argument("--distill", default="[8,4,2,8->2]")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--shard", default=None, choices=("ddp", "fsdp"))
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--global-batch", type=int, default=None)
    p.add_argument("--qparams", default="minmax")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--then-cli", default=None, help="JSON list: afterwards run `matquant ARGS` in this process")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from matquant.algorithms.training.distributed import init_distributed
    from matquant.algorithms.training.objective import build_objective
    from matquant.algorithms.training.qat_config import make_config
    from matquant.algorithms.training.qat_loop import train_qat
    from matquant.models.targets import find_targets

    d = init_distributed("cpu")
    model = tiny_llama(0, dropout=a.dropout, layers=a.layers)
    calib = structured_windows()
    obj = build_objective(None, None, a.distill, slicing="paper")  # as tests/test_qat.py's single-process runs
    cfg = make_config(steps=a.steps, lr=5e-3, batch_size=None if a.global_batch else a.batch, grad_accum=a.grad_accum,
                      save_every=a.save_every, work_dir=a.work_dir, device="cpu", shard=a.shard,
                      activation_checkpointing=a.activation_checkpointing and not a.crash_at,
                      global_batch=a.global_batch,
                      qparams=a.qparams)

    def cb(step, _model):
        if a.kill_at and step == a.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def crash(step, _model):
        if step == a.crash_at:
            raise KeyboardInterrupt(f"simulated crash after step {step}")

    if a.crash_at:  # (a crash on every rank at once; the rerun resumes from the work dir, as after a kill)
        try:
            train_qat(model, find_targets(model), calib, obj, cfg, group_size=32, symmetric=False,
                      param_dtype=torch.float16, progress=False, step_callback=crash)
        except KeyboardInterrupt:
            model = tiny_llama(0, dropout=a.dropout, layers=a.layers)  # (a crashed FSDP run leaves it sharded)
            cfg.activation_checkpointing = a.activation_checkpointing
    res = train_qat(model, find_targets(model), calib, obj, cfg, group_size=32, symmetric=False,
                    param_dtype=torch.float16, progress=False, step_callback=cb)
    from safetensors.torch import save_file

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t = {f"{n}.weight": w for n, w in res.weights.items()}
    t.update({f"{n}.codes": q.codes for n, q in res.qweights.items()})
    save_file(t, str(out / f"rank{d.rank}.safetensors"))
    (out / f"rank{d.rank}.json").write_text(json.dumps({"history": res.history, "world": d.world,
                                                         "resumed_from": res.resumed_from}))
    if a.then_cli:  # (one torchrun start for two checks: the CLI leaves the process group itself)
        from matquant.cli import main as cli

        if cli(json.loads(a.then_cli)) != 0:
            return 1
    import torch.distributed as dist

    if d.initialized_here and dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
