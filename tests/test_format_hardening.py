"""Strict loading, the same on both paths (`matquant.load` and `AutoModelForCausalLM.from_pretrained` after
`import matquant`): slicing required, dtypes/codes/NaN/shapes/pickle checked, hostile configs refused before building."""
import ast
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import matquant
from matquant.algorithms import quantize_model
from matquant.format.checkpoint import load_checkpoint, save_checkpoint
from matquant.format.config import CheckpointError, QuantConfig
from matquant.nn import MatQuantLinear
from matquant.quant.slicing import DEFAULT_SLICING

from conftest import tiny_model

SRC = Path(matquant.__file__).parent
UP = "model.layers.0.mlp.up_proj"


@pytest.fixture
def ckpt(tmp_path, tiny_tokenizer):
    model = tiny_model("llama")
    qcfg = quantize_model(model, "rtn", group_size=32, scope="ffn")  # slicing not given: the default
    d = tmp_path / "ckpt"
    save_checkpoint(model, tiny_tokenizer, d, qcfg)
    return d, model


def _from_pretrained(d):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(d)


LOADERS = {"matquant.load": matquant.load, "from_pretrained": _from_pretrained}


def _edit_config(d, fn):
    cfg = json.loads((d / "config.json").read_text())
    fn(cfg)
    (d / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(d, **kv):
    sd = load_file(str(d / "model.safetensors"))
    sd.update(kv)
    save_file(sd, str(d / "model.safetensors"))
    return sd


# ---- one slicing default ----

def test_one_slicing_default_everywhere():
    assert QuantConfig().slicing == DEFAULT_SLICING == "nested"
    assert MatQuantLinear(64, 8).slicing == DEFAULT_SLICING


def test_no_signature_in_src_defaults_to_a_literal_slicing_mode():
    """Every default slicing refers to DEFAULT_SLICING (quant/slicing.py), never to a literal mode."""
    modes = {"paper", "nested", "extra"}
    found = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            defaults = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                args = node.args
                named = args.posonlyargs + args.args
                defaults += list(zip(named[len(named) - len(args.defaults):], args.defaults))
                defaults += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
                defaults = [(a.arg, d) for a, d in defaults]
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
                defaults = [(node.target.id, node.value)]
            for name, d in defaults:
                if "slic" in name or name == "mode":
                    if isinstance(d, ast.Constant) and d.value in modes:
                        found.append(f"{path.relative_to(SRC)}:{d.lineno} {name}={d.value!r}")
    assert not found, found


@pytest.mark.parametrize("loader", LOADERS)
def test_config_without_slicing_is_refused_with_the_fix(ckpt, loader):
    d, _ = ckpt
    _edit_config(d, lambda c: c["quantization_config"].pop("slicing"))
    with pytest.raises(CheckpointError, match=r"no 'slicing'.*\"slicing\": \"paper\" or \"slicing\": \"nested\""):
        LOADERS[loader](d)


@pytest.mark.parametrize("loader", ["load_checkpoint", "from_pretrained"])
def test_nested_built_codes_are_read_nested(ckpt, loader):
    d, model = ckpt
    assert json.loads((d / "config.json").read_text())["quantization_config"]["slicing"] == "nested"
    # load_checkpoint: matquant.load's reference path (torch backend), so that the logits compare bit-exactly
    out = load_checkpoint(d) if loader == "load_checkpoint" else _from_pretrained(d)
    loaded = out[0] if isinstance(out, tuple) else out
    layers = [m for m in loaded.modules() if isinstance(m, MatQuantLinear)]
    assert layers and all(m.slicing == "nested" for m in layers)
    x = torch.randint(0, 320, (1, 8))
    matquant.set_bits(model, 2)
    matquant.set_bits(loaded, 2)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


# ---- the same tensor checks on both paths ----

def _int_embedding(sd):
    return {"model.embed_tokens.weight": sd["model.embed_tokens.weight"].to(torch.int32)}


CORRUPTIONS = {
    "integer where a float is expected": (_int_embedding, "expected a floating-point"),
    "float codes": (lambda sd: {f"{UP}.qweight": sd[f"{UP}.qweight"].float()}, "expected uint8"),
    "scales in the wrong dtype": (lambda sd: {f"{UP}.scales": sd[f"{UP}.scales"].float()}, "expected float16"),
    "NaN scale": (lambda sd: {f"{UP}.scales": torch.full_like(sd[f"{UP}.scales"], float("nan"))}, "NaN"),
    "Inf weight": (lambda sd: {"model.norm.weight": torch.full_like(sd["model.norm.weight"], float("inf"))}, "NaN/Inf"),
    "zero scale": (lambda sd: {f"{UP}.scales": torch.zeros_like(sd[f"{UP}.scales"])}, "scales <= 0"),
    "wrong shape": (lambda sd: {f"{UP}.zeros": sd[f"{UP}.zeros"][:, :1].contiguous()}, "shape"),
    "extra tensor": (lambda sd: {"model.surprise": torch.zeros(3)}, "does not use"),
}


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("what", CORRUPTIONS)
def test_corrupt_tensors_are_refused_on_both_paths(ckpt, loader, what):
    d, _ = ckpt
    fn, match = CORRUPTIONS[what]
    _edit_tensors(d, **fn(load_file(str(d / "model.safetensors"))))
    with pytest.raises(CheckpointError, match=match):
        LOADERS[loader](d)


@pytest.mark.parametrize("loader", LOADERS)
def test_codes_beyond_master_bits_are_refused_on_both_paths(ckpt, loader):
    d, _ = ckpt
    _edit_config(d, lambda c: c["quantization_config"].update(master_bits=4, default_bits=4))
    with pytest.raises(CheckpointError, match=r"codes >= 2\^4"):
        LOADERS[loader](d)


@pytest.mark.parametrize("loader", LOADERS)
def test_missing_tensor_and_pickle_are_refused_on_both_paths(ckpt, loader):
    d, _ = ckpt
    sd = load_file(str(d / "model.safetensors"))
    del sd[f"{UP}.scales"]
    save_file(sd, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing 1 tensor"):
        LOADERS[loader](d)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="never loads pickle"):
        LOADERS[loader](d)


# ---- hostile configs: refused before anything is built ----

@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("key,value", [("hidden_size", 10_000_000), ("num_hidden_layers", 100_000),
                                       ("intermediate_size", 10**9), ("vocab_size", 2**40)])
def test_oversized_config_is_refused_before_building(ckpt, loader, key, value):
    import resource

    d, _ = ckpt
    _edit_config(d, lambda c: c.update({key: value}))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(CheckpointError, match=key):
        LOADERS[loader](d)
    assert time.perf_counter() - t0 < 10
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 512 * 1024  # KiB: nothing was allocated


def test_skeleton_is_built_on_the_meta_device(ckpt):
    from matquant.format.checkpoint import build_skeleton, read_quant_config

    d, _ = ckpt
    cfg, q = read_quant_config(d)
    model = build_skeleton(cfg, q)
    assert all(p.is_meta for p in model.parameters())
    up = model.get_submodule(UP)
    assert up.qweight.is_meta and up.scales.is_meta


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(model_type=7), "model_type"),
    (lambda c: c.update(model_type="no-such-arch"), "not a valid"),
    (lambda c: c.update(num_attention_heads=3), "cannot build|not a valid"),
    (lambda c: c["quantization_config"].update(modules="model.layers.0.mlp.up_proj"), "wrong type"),
    (lambda c: c["quantization_config"].update(bits_map=[1, 2]), "wrong type"),
    (lambda c: c["quantization_config"].update(format_version=True), "format_version"),
    (lambda c: c["quantization_config"].update(modules=["model.layers.0.input_layernorm"]), "not a linear layer"),
])
def test_malformed_configs_are_checkpoint_errors(ckpt, edit, match):
    d, _ = ckpt
    _edit_config(d, edit)
    with pytest.raises(CheckpointError, match=match):
        matquant.load(d)


def test_non_regular_weights_file_is_refused(ckpt, tmp_path):
    import os

    d, _ = ckpt
    (d / "model.safetensors").unlink()
    os.mkfifo(d / "model.safetensors")  # reading it would block forever
    with pytest.raises(CheckpointError, match="not a regular file"):
        matquant.load(d)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").symlink_to(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="dangling symlink"):
        matquant.load(d)


# ---- regressions from lab/benchmarks/fuzz_loader.py (each crash class it found; seeds in docs/benchmarks.md) ----

@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("edit,match", [
    # transformers raised KeyError building LlamaRotaryEmbedding (from_pretrained: outside any check)
    (lambda c: c.update(rope_parameters={"rope_type": "no-such-rope", "rope_theta": 10000.0}), "cannot build|not a valid"),
    # transformers raised RuntimeError "negative dimension" building nn.Linear
    (lambda c: c.update(intermediate_size=-64), "at least 1"),
    # loaded fine, then the first forward raised TypeError inside transformers
    (lambda c: c.update(output_hidden_states="0b0"), "output_hidden_states is str"),
    # the long fuzz run (seed 10, #8948, #7993): loaded fine and gave NaN logits
    (lambda c: c.update(rms_norm_eps=float("nan")), "rms_norm_eps is nan"),
    # a string where a bool belongs (return_dict is not in to_dict(), so it needs BOOL_KEYS); first written for seed
    # 14 #17180, which was in fact the bool false (next case)
    (lambda c: c.update(return_dict="False"), "return_dict is str"),
    # fuzz seeds 14 #17180, 15 #12412, 16 #3154: the bool false (the fuzz log printed it as 'False'): transformers'
    # own Llama/Qwen2 forward then fails reading its inner model's output
    (lambda c: c.update(return_dict=False), "return_dict: false"),
    # fuzz seeds 15-17 (#2522, #25510, #20234, ...): a deeply nested value (here 200 levels) loaded through
    # matquant.load but made from_pretrained raise RecursionError inside transformers' config copy
    (lambda c: c["id2label"].update({"1": json.loads("[" * 200 + "]" * 200)}), "nests values"),
])
def test_fuzz_found_config_crashes_are_checkpoint_errors(ckpt, loader, edit, match):
    d, _ = ckpt
    _edit_config(d, edit)
    with pytest.raises(CheckpointError, match=match):
        LOADERS[loader](d)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("name,value", [("model.layers.1.post_attention_layernorm.weight", 3e38),
                                        ("model.embed_tokens.weight", -2e7)])
def test_finite_but_absurd_values_are_refused(ckpt, loader, name, value):
    """A flipped exponent bit gave a finite 1e38 norm weight: it loaded, and the logits were NaN."""
    d, _ = ckpt
    sd = load_file(str(d / "model.safetensors"))
    t = sd[name].clone()
    t.view(-1)[0] = value
    _edit_tensors(d, **{name: t})
    with pytest.raises(CheckpointError, match="far beyond any trained weight"):
        LOADERS[loader](d)


def test_deeply_nested_config_json_is_a_checkpoint_error(ckpt):
    d, _ = ckpt
    (d / "config.json").write_text("[" * 100000)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        matquant.load(d)


def test_weights_symlinked_to_a_device_are_refused(ckpt):
    d, _ = ckpt
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").symlink_to("/dev/zero")  # reading it never ends
    with pytest.raises(CheckpointError, match="not a regular file"):
        matquant.load(d)


# ---- errors transformers raised before any matquant hook (import matquant pre-checks local matquant folders) ----

@pytest.mark.parametrize("edit_text,match", [
    (lambda t: t[: len(t) // 2], "not valid JSON"),  # truncated config.json: transformers' JSONDecodeError/OSError
    (lambda t: "[" * 100000, "not valid JSON"),  # transformers' RecursionError
    (lambda t: t.replace('"model_type": "llama"', '"model_type": 7'), "model_type"),
    (lambda t: t.replace('"matquant"', '"gptq"'), "quant_method|matquant"),  # transformers would build another quantizer
    (lambda t: json.dumps({k: v for k, v in json.loads(t).items() if k != "quantization_config"}),
     "no quantization_config"),  # transformers loaded a plain model with the codes as unexpected keys
])
def test_from_pretrained_prechecks_a_corrupt_matquant_config(ckpt, edit_text, match):
    d, _ = ckpt
    p = d / "config.json"
    p.write_text(edit_text(p.read_text()))
    with pytest.raises(CheckpointError, match=match):
        _from_pretrained(d)


def test_from_pretrained_precheck_runs_for_direct_model_classes(ckpt):
    from transformers import LlamaForCausalLM

    d, _ = ckpt
    _edit_config(d, lambda c: c.update(num_hidden_layers=100000))
    with pytest.raises(CheckpointError, match="config"):
        LlamaForCausalLM.from_pretrained(d)


def test_precheck_leaves_other_folders_to_transformers(tmp_path):
    """A plain model folder, a GPTQ-style folder (qweight + qzeros) and a hub id are not matquant's business."""
    import transformers as T

    from matquant.format.folder import looks_like_matquant

    cfg = T.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1)
    T.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "plain")
    assert not looks_like_matquant(tmp_path / "plain")
    assert isinstance(T.AutoModelForCausalLM.from_pretrained(tmp_path / "plain"), T.LlamaForCausalLM)
    gptq = tmp_path / "gptq"
    gptq.mkdir()
    save_file({"model.layers.0.mlp.up_proj.qweight": torch.zeros(2, 2, dtype=torch.int32),
               "model.layers.0.mlp.up_proj.qzeros": torch.zeros(1, 2, dtype=torch.int32),
               "model.layers.0.mlp.up_proj.scales": torch.ones(1, 2)}, str(gptq / "model.safetensors"))
    assert not looks_like_matquant(gptq)
    assert not looks_like_matquant("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert not looks_like_matquant(b"\0bytes")


def test_matquant_folder_is_recognised_by_its_weights_when_config_is_gone(ckpt):
    from matquant.format.folder import looks_like_matquant

    d, _ = ckpt
    assert looks_like_matquant(d)
    (d / "config.json").write_text("{")
    assert looks_like_matquant(d)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        _from_pretrained(d)


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("value", ["nested", "[1]", 7, ["model.layers.0.mlp.up_proj"], {"a": 1}])
def test_config_dtype_must_name_a_float_dtype(ckpt, loader, value):
    """Long fuzz run, seed 12 #2430 / #6214: transformers raised TypeError / IndexError resolving `dtype`; seeds 13
    #4293 / 14 #1827: a list or dict crashed the first version of this check (unhashable)."""
    d, _ = ckpt
    _edit_config(d, lambda c: c.update(dtype=value))
    with pytest.raises(CheckpointError, match="dtype"):
        LOADERS[loader](d)


def test_edited_quant_method_with_unreadable_weights_is_still_recognised(ckpt):
    """Seed 12 #1164: quant_method 8 and model.safetensors a symlink loop: transformers raised OSError."""
    d, _ = ckpt
    _edit_config(d, lambda c: c["quantization_config"].update(quant_method=8))
    (d / "model.safetensors").unlink()
    (d / "model.safetensors").symlink_to(d / "model.safetensors")
    with pytest.raises(CheckpointError):
        _from_pretrained(d)
