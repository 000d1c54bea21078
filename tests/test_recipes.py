"""Named recipes (`--recipe`, `recipe=`): fill in only the options not given; the checkpoint records what was used."""
import pytest
import torch

import matquant
from matquant.algorithms.recipes import RECIPE_OPTIONS, RECIPES, check_recipe, resolve_config
from matquant.cli import build_parser
from matquant.commands.quantize import config_from_args


def test_recipes_only_set_known_options_and_methods():
    from matquant.algorithms import METHOD_CONFIGS, recipe_config

    assert "fast" in RECIPES and "quality" in RECIPES
    for name, opts in RECIPES.items():
        assert set(opts) <= set(RECIPE_OPTIONS), name
        assert opts["method"] in METHOD_CONFIGS
        config = recipe_config(name)  # a preset config: the recipe's options, the method's defaults elsewhere
        assert config.name == opts["method"]
        assert all(getattr(config, k) == v for k, v in opts.items() if k != "method"), name


def test_caller_values_win_and_unknown_names_are_errors():
    c = resolve_config(recipe="quality", clip="mse", rotate="input")
    assert (c.name, c.clip, c.rotate, c.slice_params) == ("matgptq", "mse", "input", "own")
    c = resolve_config(recipe="quality", clip=None)  # None = not given: the recipe's
    assert (c.clip, c.slice_params) == ("weighted", "own")
    assert resolve_config(recipe="quality", slice_params="shared").slice_params == "shared"  # the caller's wins
    assert resolve_config(method="rtn").clip == "minmax"  # a method alone: its own defaults
    with pytest.raises(ValueError, match=r"unknown recipe 'qualty' \(did you mean 'quality'\?\).*fast"):
        check_recipe("qualty")


def _args(*argv):
    return build_parser().parse_args(["quantize", "--out", "x", *argv])


def _config(*argv):
    return config_from_args(_args(*argv))[0]


def test_cli_recipe_fills_defaults_and_explicit_flags_win():
    c = _config("--recipe", "quality")
    assert (c.name, c.clip, c.rotate, c.slice_params) == ("matgptq", "weighted", "none", "own")
    assert "slice_params" not in _config("--recipe", "quality", "--slice-params", "shared").method_args()
    c = _config("--recipe", "quality", "--clip", "mse", "--rotate", "input", "--method", "gptq")
    assert (c.name, c.clip, c.rotate) == ("gptq", "mse", "input")
    with pytest.raises(SystemExit):
        _args("--recipe", "best-ever")


def test_the_default_is_the_quality_recipe_and_a_method_alone_is_plain():
    from matquant.algorithms import recipe_config

    assert _config() == recipe_config("quality")  # neither --method nor --recipe
    c = _config("--method", "matgptq")  # the plain method, one option away
    assert (c.clip, c.slice_params) == ("minmax", "shared") and c.method_args() == {}
    assert _config("--recipe", "fast") == c
    assert _config("--method", "rtn").method_args() == {}


def _tiny_folder(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests._tiny import bpe_tokenizer

    tok = bpe_tokenizer()
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512))
    d = tmp_path / "tiny"
    m.save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


def test_api_recipe_end_to_end_records_the_options_used(tmp_path):
    src = _tiny_folder(tmp_path)
    _, _, q = matquant.quantize(src, str(tmp_path / "ck"), recipe="quality", calib_windows=2, group_size=32,
                                progress=False)
    assert q.method == "matgptq" and q.method_args["clip"] == "weighted" and q.rotation is None
    assert q.method_args["slice_params"] == "own" and q.slice_params == [2, 3, 4, 6]
    model, _ = matquant.load(str(tmp_path / "ck"), bits=4)
    assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    _, _, q = matquant.quantize(src, None, recipe="quality", clip="mse", rotate="input", calib_windows=2,
                                group_size=32, progress=False)
    assert q.method_args["clip"] == "mse" and q.rotation["mode"] == "input"


def test_balanced_recipe_sets_the_search_weights_and_checks_them():
    kw = _config("--recipe", "balanced").method_args()
    assert kw["clip"] == "weighted" and kw["clip_lambdas"] == [4096.0, 16.0, 4.0, 1.0]
    assert _config("--recipe", "balanced", "--clip-lambdas", "64,4,2,1").method_args()[
        "clip_lambdas"] == [64.0, 4.0, 2.0, 1.0]  # the caller's value wins
    with pytest.raises(ValueError, match=r"one weight per slice of R = 8,4,2.*--recipe balanced sets --clip-lambdas"):
        _config("--recipe", "balanced", "--bits-list", "8,4,2")
