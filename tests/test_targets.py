import pytest

from matquant.algorithms import quantize_model
from matquant.models import find_targets
from matquant.nn import matquant_modules

from conftest import tiny_model

EXPECTED = {  # family: (FFN leaves, attention leaves)
    "llama": ({"gate_proj", "up_proj", "down_proj"}, {"q_proj", "k_proj", "v_proj", "o_proj"}),
    "mistral": ({"gate_proj", "up_proj", "down_proj"}, {"q_proj", "k_proj", "v_proj", "o_proj"}),
    "qwen2": ({"gate_proj", "up_proj", "down_proj"}, {"q_proj", "k_proj", "v_proj", "o_proj"}),
    "qwen3": ({"gate_proj", "up_proj", "down_proj"}, {"q_proj", "k_proj", "v_proj", "o_proj"}),
    "gemma2": ({"gate_proj", "up_proj", "down_proj"}, {"q_proj", "k_proj", "v_proj", "o_proj"}),
    "gpt2": ({"c_fc", "c_proj"}, {"c_attn", "c_proj"}),
    "gpt_neox": ({"dense_h_to_4h", "dense_4h_to_h"}, {"query_key_value", "dense"}),
    "opt": ({"fc1", "fc2"}, {"q_proj", "k_proj", "v_proj", "out_proj"}),
}


@pytest.mark.parametrize("family", sorted(EXPECTED))
def test_role_discovery(family):
    model = tiny_model(family)
    ffn = find_targets(model, "ffn")
    attn = find_targets(model, "attn")
    both = find_targets(model, "ffn+attn")
    assert {n.split(".")[-1] for n in ffn} == EXPECTED[family][0]
    assert {n.split(".")[-1] for n in attn} == EXPECTED[family][1]
    assert set(ffn) | set(attn) == set(both) and not set(ffn) & set(attn)
    assert len(ffn) == 2 * len(EXPECTED[family][0])  # two blocks
    assert not any("lm_head" in n or "embed" in n for n in both)


@pytest.mark.parametrize("family", ["gpt2", "opt", "gpt_neox"])
def test_quantize_other_families_runs(family):
    import torch

    model = tiny_model(family)
    x = torch.randint(0, 320, (1, 8))
    with torch.no_grad():
        ref = model(x).logits
        quantize_model(model, "rtn", group_size=32, scope="ffn+attn")
        out = model(x).logits
    assert len(matquant_modules(model)) > 0
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()  # GPT-2 Conv1D handled (weights transposed)


def test_unknown_architecture_points_to_modules():
    model = tiny_model("llama")
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match="--modules"):
        find_targets(model, "ffn")
    names = find_targets(model, modules=r".*\.mlp\.down_proj")
    assert len(names) == 2


def test_bad_modules_regex_and_scope():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="matches none"):
        find_targets(model, modules="nothing.*")
    with pytest.raises(ValueError, match="regular expression"):
        find_targets(model, modules="(")
    with pytest.raises(ValueError, match="scope"):
        find_targets(model, "everything")
