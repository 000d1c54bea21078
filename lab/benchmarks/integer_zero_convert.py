"""A free-zero-point checkpoint of the embedded SmolLM2 with its master's and int4 slice's pairs moved onto their
integer-zero grids (slice_params.integer_zero_pairs, codes unchanged), fitted with H = XᵀX of each layer's inputs in
the FULL-PRECISION model (one forward over N calibration windows of 512 tokens, all layers at once; the in-pass fit
of `quantize --zero-points integer` sees the quantized prefix's inputs instead). docs/drafts/vllm-exact.md.

    python lab/benchmarks/integer_zero_convert.py FREE_CKPT OUT_CKPT [N_WINDOWS]
"""
import shutil
import sys
import time

import torch
from pathlib import Path
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from matquant.models.loading import load_model
from matquant.format.checkpoint import read_quant_config
from matquant.quant.minmax import QuantizedWeight
from matquant.algorithms.slice_params import integer_zero_pairs
from matquant.data import token_windows
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
nwin = int(sys.argv[3]) if len(sys.argv) > 3 else 8
torch.set_num_threads(1)
t0 = time.time()
if dst.exists(): shutil.rmtree(dst)
shutil.copytree(src, dst)
_, q = read_quant_config(dst)
model, tok = load_model("smollm2-135m")[:2]
calib = token_windows(tok, "calib", 512, nwin)
H = {}
def hook(name):
    def f(mod, inp):
        x = inp[0].reshape(-1, inp[0].shape[-1]).float()
        H[name] = H.get(name, 0) + x.T @ x
    return f
hs = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in q.modules]
with torch.no_grad():
    for i in range(calib.shape[0]):
        model(calib[i:i+1])
for h in hs: h.remove()
print(f"H of {len(H)} layers from {calib.numel()} tokens ({time.time()-t0:.0f}s)", flush=True)
(f,) = dst.glob("model*.safetensors")
with safe_open(str(f), framework="pt") as h: meta = h.metadata()
t = load_file(f)
for i, n in enumerate(q.modules):
    W = model.get_submodule(n).weight.detach().float()
    own = {r: (t[f"{n}.scales_int{r}"], t[f"{n}.zeros_int{r}"]) for r in q.slice_params}
    qw = integer_zero_pairs(QuantizedWeight(t[f"{n}.qweight"], t[f"{n}.scales"], t[f"{n}.zeros"], 8, q.group_size, own), W, H[n], q.slicing, torch.float16)
    t[f"{n}.scales"], t[f"{n}.zeros"] = qw.scales, qw.zeros
    t[f"{n}.scales_int4"], t[f"{n}.zeros_int4"] = qw.slice_params[4]
    if i % 10 == 0: print(i, n, f"{time.time()-t0:.0f}s", flush=True)
save_file(t, f, metadata=meta)
print("ok", f"{time.time()-t0:.0f}s")
