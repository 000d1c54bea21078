"""Save the codes every training/one-shot method produces on a tiny seeded Llama (fixed seeds, 1 thread), or compare
two such snapshots. Used to check that a refactor of algorithms/ leaves results bit-identical:

    git worktree add ../matquant-old <commit>
    PYTHONPATH=../matquant-old/src python lab/scripts/training_codes_snapshot.py save old.safetensors
    PYTHONPATH=src python lab/scripts/training_codes_snapshot.py save new.safetensors
    python lab/scripts/training_codes_snapshot.py compare old.safetensors new.safetensors

Only the public `quantize_model` entry point is used, so the script runs against any version of the package.
"""
from __future__ import annotations

import copy
import sys

import torch

CONFIGS = {
    "omni_default": ("omniquant", dict(epochs=2)),
    "omni_distill_let": ("omniquant", dict(epochs=1, distill="[8,4,2,8->4;2]", let=True)),
    "omni_fp_inputs_balance": ("omniquant", dict(epochs=1, distill="[8,4,8->2]", block_inputs="fp",
                                                 loss_balance="initial")),
    "omni_sp_sym": ("omniquant", dict(epochs=1, bits_list=[4, 2], symmetric=True)),
    "qat_default": ("qat", dict(steps=4, lr=5e-3, save_every=0, device="cpu")),
    "qat_distill_learnable": ("qat", dict(steps=3, lr=1e-5, save_every=0, device="cpu", distill="[8,4,2,8->2]",
                                          qparams="learnable", grad_accum=2)),
    "matgptq": ("matgptq", dict()),
    "gptq": ("gptq", dict()),
}


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def save(path: str) -> None:
    from safetensors.torch import save_file

    from matquant.algorithms import quantize_model

    torch.set_num_threads(1)
    base = tiny_llama()
    calib = torch.randint(0, 256, (6, 32), generator=torch.Generator().manual_seed(1))
    out = {}
    for name, (method, kw) in CONFIGS.items():
        model = copy.deepcopy(base)
        kw = dict(kw)
        sym = kw.pop("symmetric", False)
        quantize_model(model, method, calib=calib, group_size=32, symmetric=sym, progress=False,
                       slicing="nested", scope="ffn+attn" if method == "omniquant" else "ffn", **kw)
        for n, m in model.named_modules():
            if hasattr(m, "qweight"):
                out[f"{name}/{n}/codes"] = m.qweight.detach().clone().contiguous()
                out[f"{name}/{n}/scales"] = m.scales.detach().clone().contiguous()
                out[f"{name}/{n}/zeros"] = m.zeros.detach().clone().contiguous()
        for n, p in model.named_parameters():  # LET rewrites norms: every fp tensor must match too
            if "norm" in n:
                out[f"{name}/{n}"] = p.detach().clone().contiguous()
        print(name, "done", flush=True)
    save_file(out, path)


def compare(a: str, b: str) -> int:
    from safetensors.torch import load_file

    x, y = load_file(a), load_file(b)
    if x.keys() != y.keys():
        print("different tensor names:", sorted(set(x) ^ set(y))[:10])
        return 1
    bad = [k for k in x if not torch.equal(x[k], y[k])]
    per = sorted({k.split("/")[0] for k in x})
    for c in per:
        n = [k for k in x if k.startswith(c + "/")]
        nb = [k for k in bad if k.startswith(c + "/")]
        print(f"{c:28s} {len(n):4d} tensors  {'IDENTICAL' if not nb else f'{len(nb)} DIFFER'}")
    return 1 if bad else 0


if __name__ == "__main__":
    if sys.argv[1] == "save":
        save(sys.argv[2])
    else:
        sys.exit(compare(sys.argv[2], sys.argv[3]))
