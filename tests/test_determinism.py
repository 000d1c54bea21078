"""Quantization is deterministic for a given thread count (the demo and `quantize --threads` fix it)."""
import torch

from matquant.algorithms import quantize_model


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64)).eval()


def test_matgptq_repeats_bit_identically_at_a_fixed_thread_count():
    calib = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        runs = []
        for _ in range(2):
            m = _tiny()
            quantize_model(m, "matgptq", group_size=32, calib=calib, progress=False)
            runs.append({k: v.clone() for k, v in m.state_dict().items() if k.endswith("qweight")})
    finally:
        torch.set_num_threads(n)
    assert runs[0].keys() == runs[1].keys() and len(runs[0]) == 6
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])


def test_threads_option_is_applied_and_validated():
    import argparse

    import pytest

    from matquant.algorithms.pipeline import set_threads
    from matquant.commands.quantize import add_quant_args

    p = argparse.ArgumentParser()
    add_quant_args(p, threads_default=2)
    assert p.parse_args([]).threads == 2
    n = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="--threads"):
            set_threads(0)
    finally:
        torch.set_num_threads(n)
