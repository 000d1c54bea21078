"""One config per method: its defaults are the method function's, its flags are the CLI's, `--method X --help`
shows X's options only, and the Python entry point takes a config."""
import inspect
import subprocess
import sys

import pytest
import torch

import matquant
from matquant.algorithms import METHOD_CONFIGS, METHODS, make_config
from matquant.algorithms.configs.base import flag_of


@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_each_method_function_takes_its_config(method):
    params = list(inspect.signature(METHODS[method]).parameters)
    assert params[:5] == ["model", "targets", "config", "calib", "progress"], params
    assert METHOD_CONFIGS[method].function.endswith(":" + METHODS[method].__name__)
    assert all(f.metadata["help"] for f in METHOD_CONFIGS[method].option_fields()), "every option has its help"


@pytest.mark.parametrize("method", sorted(METHOD_CONFIGS))
def test_help_of_one_method_shows_its_options_only(method):
    out = subprocess.run([sys.executable, "-m", "matquant", "quantize", "--method", method, "--help"],
                         capture_output=True, text=True, check=True).stdout
    mine = {flag_of(f) for f in METHOD_CONFIGS[method].option_fields() if f.metadata.get("cli", True)}
    others = {flag_of(f) for c in METHOD_CONFIGS.values() for f in c.option_fields()
              if f.metadata.get("cli", True)} - mine
    import re

    shown = set(re.findall(r"^\s+(--[a-z-]+)", out, re.M))
    assert mine <= shown, mine - shown
    assert not shown & others, f"{method} --help shows {shown & others}"
    assert "--out" in out and "--calib-text" in out


def test_python_entry_point_takes_a_config(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64)).eval()
    calib = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    m, _, q = matquant.quantize(model, matquant.MatGPTQConfig(group_size=32, damp=0.02), calib=calib)
    assert m is model and q.method == "matgptq" and q.method_args == {"damp": 0.02}
    assert isinstance(model.model.layers[0].mlp.up_proj, matquant.MatQuantLinear)
    with pytest.raises(ValueError, match="either a config or method"):
        matquant.quantize(model, matquant.RTNConfig(), method="rtn")


def test_config_validate_gives_the_clear_errors():
    with pytest.raises(ValueError, match="unknown option.*'epoch'.*did you mean 'epochs'"):
        make_config("omniquant", epoch=3)
    with pytest.raises(ValueError, match="one weight per slice"):
        make_config("matgptq", clip="weighted", clip_lambdas=[1, 1])
    with pytest.raises(ValueError, match="unknown method 'matgpt' \\(did you mean 'matgptq'\\?\\)"):
        make_config("matgpt")
    assert matquant.recipe_config("quality").replace(group_size=128).group_size == 128


def test_calibration_sizes_are_checked():
    from matquant.algorithms import Calibration

    for bad in ({"windows": 0}, {"seqlen": 1}, {"offset": -1}, {"windows": 2.5}):
        with pytest.raises(ValueError, match="must be an integer"):
            Calibration(**bad)
    assert Calibration(windows=None).resolved(make_config("omniquant")).windows == 8  # the method's default
