"""Column-loop time of GPTQ / MatGPTQ on SmolLM2-sized FFN weights (random data, 1 thread).

    OMP_NUM_THREADS=1 PYTHONPATH=src python lab/benchmarks/gptq_speed.py
"""
import torch, time
torch.set_num_threads(1)
from matquant.algorithms.gptq import gptq_quantize_weight
from matquant.algorithms.matgptq import MultiSliceRounder, matgptq_quantize_weight
for out_f, in_f in [(1536, 576), (576, 1536)]:
    W = torch.randn(out_f, in_f); X = torch.randn(4096, in_f); H = 2 * X.T @ X / 4096
    t = time.time(); gptq_quantize_weight(W, H, 4, 64); a = time.time() - t
    r = MultiSliceRounder(8, (8, 4, 2), (0.1, 0.1, 1.0), "paper")
    t = time.time(); matgptq_quantize_weight(W, H, r, 64); b = time.time() - t
    t = time.time(); matgptq_quantize_weight(W, H, r, 64, group_params="search"); c = time.time() - t
    print(out_f, in_f, f"gptq {a:.2f}s matgptq {b:.2f}s search {c:.2f}s")
