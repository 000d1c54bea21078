"""Layer-level comparison of GPTQ / MatGPTQ options on synthetic data (seconds on one core).

W ~ N(0,1) [128, 256], X = correlated Gaussian inputs (4096 tokens, anisotropic mixing), group 64. Prints the
relative output error ||X(W − Ŵ_r)ᵀ||² / ||XWᵀ||² of every slice int8/6/4/3/2 in paper and nested slicing for
RTN int8 sliced, GPTQ int8 sliced, MatGPTQ with each error feedback and several λ, dedicated GPTQ int4/3/2, and
the group-parameter search.

    OMP_NUM_THREADS=1 PYTHONPATH=src python lab/benchmarks/gptq_synthetic.py
"""
import torch
torch.set_num_threads(1)
from matquant.algorithms.gptq import gptq_quantize_weight
from matquant.algorithms.matgptq import MultiSliceRounder, matgptq_quantize_weight
from matquant.quant.minmax import dequantize, quantize_minmax
g = torch.Generator().manual_seed(0)
d=256
mix = torch.randn(d, d, generator=g) * torch.linspace(0.05, 2.0, d)
X = torch.randn(4096, d, generator=g) @ mix
W = torch.randn(128, d, generator=g)
H = 2 * X.T @ X / 4096
ref = (X @ W.T).pow(2).mean()
def err(qw, r, mode): return ((X @ (W - dequantize(qw, r, mode)).T) ** 2).mean().item() / ref
for mode in ("paper", "nested"):
    print(mode)
    rows = {}
    rows["rtn8"] = quantize_minmax(W, 8, 64, param_dtype=torch.float32)
    rows["gptq8"] = gptq_quantize_weight(W, H, 8, 64, param_dtype=torch.float32)[0]
    for fb in ("weighted", "mean", "master"):
        for lam in [(0.1, 0.1, 1.0), (1, 1, 1), (16, 4, 1)]:
            rows[f"mat {fb} {lam}"] = matgptq_quantize_weight(W, H, MultiSliceRounder(8, (8,4,2), lam, mode, fb), 64, param_dtype=torch.float32)[0]
    for k, qw in rows.items():
        print(f"  {k:32s}", " ".join(f"{err(qw, r, mode):.2e}" for r in (8, 6, 4, 3, 2)))
    for b in (4, 3, 2):
        print(f"  dedicated gptq{b}", f"{err(gptq_quantize_weight(W, H, b, 64, param_dtype=torch.float32)[0], b, mode):.2e}")
print("search")
for mode in ("paper", "nested"):
    for fb, lam in [("weighted", (16,4,1)), ("weighted", (1,1,1)), ("master", (0.1,0.1,1)), ("weighted", (4,2,1))]:
        qw = matgptq_quantize_weight(W, H, MultiSliceRounder(8, (8,4,2), lam, mode, fb), 64, param_dtype=torch.float32, group_params="search")[0]
        print(f"  {mode} {fb} {lam} search", " ".join(f"{err(qw, r, mode):.2e}" for r in (8, 6, 4, 3, 2)))
        qw = matgptq_quantize_weight(W, H, MultiSliceRounder(8, (8,4,2), lam, mode, fb), 64, param_dtype=torch.float32)[0]
        print(f"  {mode} {fb} {lam} minmax", " ".join(f"{err(qw, r, mode):.2e}" for r in (8, 6, 4, 3, 2)))
