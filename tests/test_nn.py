import pytest
import torch
from torch import nn

import matquant
from matquant.algorithms import quantize_model
from matquant.nn import MatQuantLinear, effective_bits, get_bits, set_bits
from matquant.quant.minmax import dequantize, quantize_minmax

from conftest import tiny_model


def test_matquantlinear_forward_equals_dequantized_matmul():
    lin = nn.Linear(64, 32, bias=True)
    qw = quantize_minmax(lin.weight.detach(), 8, 16)
    m = MatQuantLinear.from_quantized(qw, lin.bias)
    x = torch.randn(3, 5, 64)
    for r in (8, 6, 4, 3, 2):
        for mode in ("paper", "nested", "extra"):
            m.set_bits(r, mode)
            ref = x @ dequantize(qw, r, mode).t() + lin.bias.detach()
            assert torch.allclose(m(x), ref, atol=1e-5)


def test_set_bits_switches_in_place_and_invalidates_cache():
    lin = nn.Linear(64, 16)
    m = MatQuantLinear.from_quantized(quantize_minmax(lin.weight.detach(), 8, 64), None)
    x = torch.randn(2, 64)
    y8 = m(x)
    m.set_bits(2)
    y2 = m(x)
    assert not torch.allclose(y8, y2)
    m.set_bits(8)
    assert torch.equal(m(x), y8)
    with pytest.raises(ValueError, match="1..8"):
        m.set_bits(0)


def test_model_set_bits_int_and_map():
    model = tiny_model("llama")
    quantize_model(model, "rtn", group_size=32, scope="ffn+attn")
    names = list(get_bits(model))
    set_bits(model, 4)
    assert set(get_bits(model).values()) == {4}
    now = set_bits(model, {"model.layers.0.mlp.*": 2, r"model\.layers\.1\..*proj": 8})
    assert now["model.layers.0.mlp.up_proj"] == 2 and now["model.layers.1.self_attn.q_proj"] == 8
    assert now["model.layers.0.self_attn.q_proj"] == 4  # unmatched keeps its bits
    assert effective_bits(model) > 2
    with pytest.raises(ValueError, match="match no quantized module"):
        set_bits(model, {"model.layers.7.mlp.up_proj": 4})
    with pytest.raises(ValueError, match="1..8"):
        set_bits(model, {names[0]: 9})
    with pytest.raises(ValueError, match="1..8"):
        set_bits(model, 0)


def test_set_bits_on_unquantized_model_is_a_clear_error():
    with pytest.raises(ValueError, match="no MatQuantLinear"):
        matquant.set_bits(tiny_model("llama"), 4)


def test_dedicated_master_rejects_higher_bits():
    model = tiny_model("llama")
    quantize_model(model, "rtn", master_bits=4, group_size=32)
    with pytest.raises(ValueError, match="master"):
        set_bits(model, 8)


def test_quantized_model_output_close_at_int8():
    model = tiny_model("llama")
    x = torch.randint(0, 320, (2, 16))
    with torch.no_grad():
        ref = model(x).logits
        quantize_model(model, "rtn", group_size=32, scope="ffn+attn")
        out = model(x).logits
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
