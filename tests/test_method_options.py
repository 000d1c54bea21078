"""Unknown method options are errors naming the valid ones (they used to be dropped by `**_` and then recorded in
the checkpoint's method_args as if used)."""
import pytest
import torch

import matquant
from matquant.algorithms import METHODS, make_config, method_options, quantize_model


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
        make_config("omniquant", epoch=5)
    make_config("omniquant", epochs=1, lr_lwc=0.1)
    assert "epochs" in method_options("omniquant") and "steps" in method_options("qat")
    assert method_options("rtn") == ["clip", "slice_params", "zero_points"]


def test_public_quantize_refuses_before_loading_the_model(tmp_path):
    with pytest.raises(ValueError, match="unknown option.*'epoch'"):
        matquant.quantize(str(tmp_path / "no-such-model"), method="omniquant", epoch=5)


def test_method_args_are_exactly_the_options_used():
    calib = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    qcfg = quantize_model(_tiny(), "gptq", group_size=32, calib=calib, progress=False, damp=0.02)
    assert qcfg.method_args == {"damp": 0.02}


def _cli_config(*argv):
    from matquant.cli import build_parser
    from matquant.commands.quantize import config_from_args

    return config_from_args(build_parser().parse_args(["quantize", "--out", "x", *argv]))[0]


def _cli_kwargs(*argv):
    """The method options the flags set that differ from the method's defaults."""
    c = _cli_config(*argv)
    plain = type(c)()
    return {k: v for k, v in c.method_kwargs().items() if getattr(plain, k) != v}


@pytest.mark.parametrize("argv, flag, methods", [
    (["--method", "rtn", "--damp", "0.1"], "--damp", "gptq or matgptq"),
    (["--method", "omniquant", "--act-order"], "--act-order", "gptq or matgptq"),
    (["--method", "gptq", "--propagate", "4"], "--propagate", "matgptq"),
    (["--method", "gptq", "--lambdas", "1"], "--lambdas", "matgptq or omniquant or qat"),
    (["--method", "matgptq", "--steps", "5"], "--steps", "qat"),
    (["--method", "omniquant", "--no-amp"], "--no-amp", "qat"),
    (["--method", "qat", "--epochs", "3"], "--epochs", "omniquant"),
    (["--method", "rtn", "--seed", "1"], "--seed", "omniquant or qat"),
])
def test_cli_flag_of_another_method_is_an_error(argv, flag, methods):
    with pytest.raises(ValueError, match=rf"^{flag} applies to --method {methods}, not {argv[1]}; drop {flag}"):
        _cli_kwargs(*argv)


def test_cli_flags_of_the_chosen_method_pass_and_defaults_are_not_given():
    assert _cli_kwargs("--method", "matgptq", "--damp", "0.02", "--propagate", "fp")["propagate"] == "fp"
    assert _cli_kwargs("--method", "omniquant", "--weight-decay", "0.1")["weight_decay"] == 0.1  # was dropped
    assert _cli_kwargs("--method", "qat", "--no-amp")["amp"] is False
    with pytest.raises(ValueError, match="--damp applies to --method gptq or matgptq, not rtn"):
        _cli_kwargs("--method", "rtn", "--damp", "0.01")  # even at its default value: a flag rtn never reads


def test_clip_lambdas_weights_only_the_search_and_is_checked_up_front():
    assert _cli_kwargs("--clip", "weighted", "--clip-lambdas", "256,4,2,1")["clip_lambdas"] == [256, 4, 2, 1]
    assert "clip_lambdas" not in _cli_config("--clip", "weighted").method_args()  # recorded only when given
    with pytest.raises(ValueError, match="needs --clip weighted or mse"):
        _cli_kwargs("--method", "matgptq", "--clip-lambdas", "256,4,2,1")
    with pytest.raises(ValueError, match="one weight per slice of R = 8,4,3,2"):
        _cli_kwargs("--clip", "weighted", "--clip-lambdas", "1,1")
    with pytest.raises(ValueError, match="--clip-lambdas applies to --method gptq or matgptq or omniquant or qat, not rtn"):
        _cli_kwargs("--method", "rtn", "--clip", "mse", "--clip-lambdas", "1")
    calib = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    res = {}
    for cl in (None, (16, 4, 2, 1), (4096, 16, 4, 1)):
        model = _tiny()
        quantize_model(model, "matgptq", group_size=32, calib=calib, progress=False, clip="weighted",
                       **({} if cl is None else {"clip_lambdas": cl}))
        res[cl] = torch.cat([m.scales.flatten().float() for m in model.modules() if hasattr(m, "qweight")])
    assert torch.equal(res[None], res[(16, 4, 2, 1)])  # the default search weights are MatGPTQ's λ
    assert not torch.equal(res[None], res[(4096, 16, 4, 1)])  # other weights move the searched ranges


def test_gptq_clip_lambdas_weight_its_served_slices():
    """GPTQ's search serves the master and 6,4,3,2 below it; 1,0,0 at master 4 searches for int4 alone."""
    assert _cli_kwargs("--method", "gptq", "--bits-master", "4", "--clip", "weighted",
                       "--clip-lambdas", "1,0,0")["clip_lambdas"] == [1, 0, 0]
    with pytest.raises(ValueError, match="one weight per slice of R = 4,3,2"):
        _cli_kwargs("--method", "gptq", "--bits-master", "4", "--clip", "weighted", "--clip-lambdas", "1,0")
    with pytest.raises(ValueError, match="needs --clip weighted or mse"):
        quantize_model(_tiny(), "gptq", master_bits=4, group_size=32, progress=False, clip_lambdas=(1, 0, 0),
                       calib=torch.zeros(1, 4, dtype=torch.long))
    calib = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    res = {}
    for cl in (None, (1, 0, 0)):
        model = _tiny()
        quantize_model(model, "gptq", master_bits=4, group_size=32, calib=calib, progress=False, clip="weighted",
                       **({} if cl is None else {"clip_lambdas": cl}))
        res[cl] = torch.cat([m.scales.flatten().float() for m in model.modules() if hasattr(m, "qweight")])
    assert not torch.equal(res[None], res[(1, 0, 0)])  # searching for int4 alone moves the ranges


@pytest.mark.parametrize("method, extra", [("omniquant", {"epochs": 0}),
                                           ("qat", {"steps": 1, "qparams": "learnable", "save_every": 0})])
def test_training_methods_take_clip_lambdas_for_their_start(method, extra):
    """OmniQuant / QAT start their learnable clipping at the search; --clip-lambdas weights that search only."""
    args = ["--method", method, "--bits-list", "8,4,2", "--clip", "weighted"] + \
        (["--qparams", "learnable"] if method == "qat" else [])
    assert _cli_kwargs(*args, "--clip-lambdas", "256,4,1")["clip_lambdas"] == [256, 4, 1]
    with pytest.raises(ValueError, match="one weight per slice of R = 8,4,2"):
        _cli_kwargs(*args, "--clip-lambdas", "1,1")
    with pytest.raises(ValueError, match="needs --clip weighted or mse"):
        _cli_kwargs("--method", method, "--bits-list", "8,4,2", "--clip-lambdas", "1,1,1")
    calib = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    res = {}
    for cl in (None, (0.1, 0.1, 1), (4096, 16, 1)):  # (almost) no training: the checkpoint is the searched start
        model = _tiny()
        quantize_model(model, method, group_size=32, calib=calib, progress=False, clip="weighted",
                       bits_list=[8, 4, 2], lambdas=[0.1, 0.1, 1], **extra,
                       **({} if cl is None else {"clip_lambdas": cl}))
        res[cl] = torch.cat([m.scales.flatten().float() for m in model.modules() if hasattr(m, "qweight")])
    assert torch.equal(res[None], res[(0.1, 0.1, 1)])  # default: the objective's λ
    assert not torch.equal(res[None], res[(4096, 16, 1)])
