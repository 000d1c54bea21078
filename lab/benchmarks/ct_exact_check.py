"""Export CKPT at int8 and int4 as compressed-tensors (fp16 scales), read back with transformers +
CompressedTensorsConfig(dequantize=True), compare logits with matquant's slice (torch backend) on 512 eval tokens,
and with the slice's weights rounded to fp16 (the fp16 baseline). docs/drafts/vllm-exact.md.

    python lab/benchmarks/ct_exact_check.py CKPT OUT_DIR      # OUT_DIR/ct-int{8,4}, OUT_DIR/exact.jsonl
"""
import json
import sys
import time

import torch
from pathlib import Path
from transformers import AutoModelForCausalLM, CompressedTensorsConfig
import matquant
from matquant.integrations.compressed_tensors_export import export_compressed_tensors
from matquant.integrations.export_slices import CheckpointSource
from matquant.data import token_windows
torch.set_num_threads(1)
ckpt, out = Path(sys.argv[1]), Path(sys.argv[2])
model, tok = matquant.load(ckpt, backend="torch")[:2]
ids = token_windows(tok, "eval", 512, 1)
res = []
for bits in (8, 4):
    d = out / f"ct-int{bits}"
    t = time.time()
    with CheckpointSource(ckpt, bits) as src:
        rep = export_compressed_tensors(src, None, d, overwrite=True)
    print(rep.summary(), f"({time.time()-t:.0f}s)", flush=True)
    back = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32,
                                                quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    matquant.set_bits(model, bits)
    with torch.no_grad():
        a, b = model(ids).logits, back(ids).logits
    gap = float((a - b).abs().max() / a.abs().max())
    # the fp16 baseline: matquant's own slice with its weights rounded to fp16 (what an fp16 dense export holds)
    from matquant.nn.bits import matquant_modules
    for name, m in matquant_modules(model).items():
        back.get_submodule(name).weight.data.copy_(m.dequantized_weight(torch.float32).half().float())
    with torch.no_grad():
        c = back(ids).logits
    gap16 = float((a - c).abs().max() / a.abs().max())
    exact = sum(m.exact_groups == 1.0 for m in rep.modules)
    r = {"ckpt": str(ckpt), "bits": bits, "exact_modules": exact, "modules": len(rep.modules),
         "worst_rel_rms": max(m.rel_rms_error for m in rep.modules), "worst_max_abs": max(m.max_error for m in rep.modules),
         "logit_max_abs_diff_rel": gap, "fp16_slice_logit_diff_rel": gap16, "tokens": int(ids.numel())}
    print(json.dumps(r), flush=True)
    res.append(r)
    del back
(out / "exact.jsonl").write_text("".join(json.dumps(r) + "\n" for r in res))
