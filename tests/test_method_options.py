"""Unknown method options are errors naming the valid ones (they used to be dropped by `**_` and then recorded in
the checkpoint's method_args as if used)."""
import pytest
import torch

import matquant
from matquant.algorithms import METHODS, check_method_options, method_options, quantize_model


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64)).eval()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_unknown_option_is_an_error_naming_the_valid_ones(method):
    calib = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    model = _tiny()
    with pytest.raises(ValueError, match=rf"unknown option\(s\) for method '{method}': 'epoch'") as e:
        quantize_model(model, method, group_size=32, calib=calib, progress=False, epoch=5)
    for opt in method_options(method):
        assert opt in str(e.value)
    assert not any(hasattr(m, "qweight") for m in model.modules())  # refused before any work


def test_close_match_is_suggested_and_valid_options_pass():
    with pytest.raises(ValueError, match="did you mean 'epochs'"):
        check_method_options("omniquant", {"epoch": 5})
    check_method_options("omniquant", {"epochs": 1, "lr_lwc": 0.1})
    assert "epochs" in method_options("omniquant") and "steps" in method_options("qat")
    assert method_options("rtn") == ["clip"]


def test_public_quantize_refuses_before_loading_the_model(tmp_path):
    with pytest.raises(ValueError, match="unknown option.*'epoch'"):
        matquant.quantize(str(tmp_path / "no-such-model"), method="omniquant", epoch=5)


def test_method_args_are_exactly_the_options_used():
    calib = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    qcfg = quantize_model(_tiny(), "gptq", group_size=32, calib=calib, progress=False, damp=0.02)
    assert qcfg.method_args == {"damp": 0.02}
