"""`matquant export --format hf` (a plain transformers folder of one slice or bits map) and its old spelling
`matquant slice`: the same files, byte for byte; options of the other formats are refused."""
import json

import pytest
from conftest import tiny_model

from matquant.algorithms import quantize_model
from matquant.cli import main
from matquant.format.checkpoint import save_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("hf")
    m = tiny_model("llama")
    q = quantize_model(m, "rtn", scope="ffn+attn", group_size=32, slicing="nested", progress=False)
    return save_checkpoint(m, tiny_tokenizer, d / "ck", q)


def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("extra", [["--bits", "3"], ["--bits", "4", "--dtype", "bfloat16", "--slicing", "paper"],
                                   ["--bits-map", "MAP"]])
def test_export_hf_writes_what_slice_writes(ckpt, tmp_path, extra):
    bits_map = tmp_path / "map.json"
    bits_map.write_text(json.dumps({"model.layers.0.*": 2, "model.layers.1.*": 4}))
    extra = [str(bits_map) if a == "MAP" else a for a in extra]
    assert main(["slice", str(ckpt), *extra, "--out", str(tmp_path / "a")]) == 0
    assert main(["export", str(ckpt), *extra, "--format", "hf", "--out", str(tmp_path / "b")]) == 0
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert "quantization_config" not in json.loads(a["config.json"])
    assert a == b


@pytest.mark.parametrize("bad", [["--k-quants"], ["--pack-bits", "4"], ["--zero-fit", "lsq"]])
def test_export_hf_refuses_other_formats_options(ckpt, tmp_path, capsys, bad):
    assert main(["export", str(ckpt), "--bits", "4", "--format", "hf", *bad, "--out", str(tmp_path / "x")]) == 1
    assert "apply to --format" in capsys.readouterr().err and not (tmp_path / "x").exists()
