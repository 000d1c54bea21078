import pytest
import torch

from matquant.models import load_model, resolve_model

from conftest import tiny_model


def test_local_folder_loads(tiny_model_dir):
    model, tok, src = load_model(str(tiny_model_dir))
    assert model.config.model_type == "llama" and tok is not None


def test_nan_weights_are_refused(tmp_path, tiny_tokenizer):
    m = tiny_model("llama")
    with torch.no_grad():
        m.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    m.save_pretrained(tmp_path / "nan")
    tiny_tokenizer.save_pretrained(tmp_path / "nan")
    with pytest.raises(ValueError, match="NaN/Inf.*up_proj"):
        load_model(str(tmp_path / "nan"))


def test_pickle_only_folder_is_refused(tmp_path, tiny_model_dir):
    import shutil

    d = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, d)
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04 pretend pickle")
    with pytest.raises(ValueError, match="never loads pickle"):
        load_model(str(d))


def test_bad_specs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such model"):
        resolve_model(str(tmp_path / "missing" / "dir"))
    f = tmp_path / "weights.txt"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a .gguf"):
        resolve_model(str(f))
    assert resolve_model("org/some-model").path == "org/some-model"  # hub ids stay real


def test_hub_id_offline_gives_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once, at import; without this it retries the network for ~20 s.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="Offline\\?"):
        load_model("matquant-test/does-not-exist")


def test_matquant_checkpoint_is_not_a_source(tmp_path, tiny_model_dir):
    from matquant.cli import main

    ck = tmp_path / "ck"
    assert main(["quantize", "--method", "rtn", "--model", str(tiny_model_dir), "--out", str(ck), "--group-size", "32"]) == 0
    with pytest.raises(ValueError, match="already a matquant checkpoint"):
        load_model(str(ck))
