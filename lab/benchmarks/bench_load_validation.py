"""Cost of the load-time checks (format/validate.py) on a SmolLM2-135M RTN checkpoint: header read (of every weight
file and the index), the value check of every tensor, the trial meta-device build of from_pretrained, and the two
full load paths (best of 3, 1 thread). A sharded checkpoint folder (model.safetensors.index.json) works the same.

    PYTHONPATH=src python lab/benchmarks/bench_load_validation.py [CKPT_DIR]   (an RTN checkpoint is built if missing)

CKPT_DIR defaults to WORK/smollm2-rtn, WORK being $MATQUANT_WORK, else ./matquant-work (lab/benchmarks/_paths.py).
"""
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

import matquant
from _paths import work_path
from matquant.format import validate as V
from matquant.format.checkpoint import (build_model, build_skeleton, load_checkpoint, merged_header, read_quant_config,
                                        tied_keys, weight_headers)
from matquant.format.folder import checkpoint_files, weight_map_of


def best_of(fn, n=3) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main():
    torch.set_num_threads(1)
    d = Path(sys.argv[1]) if len(sys.argv) > 1 else work_path("smollm2-rtn")
    if not d.exists():
        matquant.quantize("smollm2-135m", out=str(d), method="rtn", group_size=64, slicing="nested")
    cfg, q = read_quant_config(d)
    _, w = checkpoint_files(d)
    skeleton = build_skeleton(cfg, q, header=merged_header(weight_headers(d)))
    hf_cfg = AutoConfig.from_pretrained(d)

    def trial():
        with torch.device("meta"):
            build_model(hf_cfg)

    print(json.dumps({
        "read_header_s": round(best_of(lambda: weight_headers(d)), 4),
        "validate_tensors_s": round(best_of(lambda: V.validate_tensors(w, skeleton, q, tied_keys(skeleton),
                                                                       weight_map_of(d))), 3),
        "trial_meta_build_s": round(best_of(trial), 3),
        "load_checkpoint_s": round(best_of(lambda: load_checkpoint(d)), 3),
        "from_pretrained_s": round(best_of(lambda: AutoModelForCausalLM.from_pretrained(d)), 3),
        "weights_MiB": round(sum(os.path.getsize(f) for f in w) / 2**20, 1), "weight_files": len(w), "loadavg": os.getloadavg(),
        "torch": torch.__version__}))


if __name__ == "__main__":
    main()
