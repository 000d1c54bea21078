"""Quick sweep of the LWC learning rate on SmolLM2-135M blocks 0-1 (FFN, g64, MatQuant [8,4,2], nested slicing).

    PYTHONPATH=src python -u lab/scripts/omniquant_lr_sweep.py 2>&1 | grep 'loss\\|^0'

Prints each block's mean training loss of the first and the last epoch (8 windows x 256 tokens, 4 epochs) per lr.
"""
import copy
import sys
import time

import torch

from matquant.algorithms import quantize_model
from matquant.data import token_windows
from matquant.models import load_model

torch.set_num_threads(1)
m0, tok, _ = load_model(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m")
calib = token_windows(tok, "calib", 256, 8)
for lr in [1e-2, 5e-2, 2e-1]:
    m = copy.deepcopy(m0)
    t = time.time()
    quantize_model(m, "omniquant", calib=calib, modules=r"model\.layers\.[0-1]\.mlp\..*", epochs=4, slicing="nested",
                   lr_lwc=lr, bits_list=[8, 4, 2], progress=True)
    print(lr, f"{time.time() - t:.0f}s", flush=True)
