"""The command line end to end on a tiny local model folder."""
import json

import pytest
import torch

import matquant
from matquant.cli import main


def test_quantize_eval_slice_info(tmp_path, tiny_model_dir, text_file, capsys):
    ck = tmp_path / "ck"
    assert main(["quantize", "--method", "rtn", "--model", str(tiny_model_dir), "--out", str(ck), "--group-size", "32",
                 "--scope", "ffn+attn"]) == 0
    assert (ck / "model.safetensors").exists() and (ck / "tokenizer.json").exists()
    rows_file = tmp_path / "rows.json"
    assert main(["eval", str(ck), "--bits", "8,4,2", "--slicing", "paper,nested", "--eval-text", str(text_file),
                 "--seqlen", "32", "--windows", "2", "--json", str(rows_file)]) == 0
    rows = json.loads(rows_file.read_text())
    assert [(r["bits"], r["slicing"]) for r in rows] == [(8, "any"), (4, "paper"), (4, "nested"), (2, "paper"),
                                                         (2, "nested")]
    assert all(r["ppl"] > 1 and r["tokens"] == 2 * 31 for r in rows)
    out = capsys.readouterr().out
    assert "| rtn | 4 | nested |" in out

    bits_map = tmp_path / "map.json"
    bits_map.write_text(json.dumps({"model.layers.0.*": 2}))
    assert main(["eval", str(ck), "--bits", "8", "--bits-map", str(bits_map), "--eval-text", str(text_file),
                 "--seqlen", "32", "--windows", "1"]) == 0

    s4 = tmp_path / "s4"
    assert main(["slice", str(ck), "--bits", "4", "--out", str(s4)]) == 0
    cfg = json.loads((s4 / "config.json").read_text())
    assert "quantization_config" not in cfg
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(s4)
    q, _ = matquant.load(ck, bits=4, backend="torch")  # the reference path: bit-exact with the exported slice
    x = torch.randint(0, 320, (1, 16))
    with torch.no_grad():
        assert torch.allclose(plain(x).logits, q(x).logits, atol=1e-5)
    assert main(["info", str(ck), "--modules"]) == 0
    assert "int8 master codes" in capsys.readouterr().out


def test_cli_errors_are_one_clear_line(tmp_path, tiny_model_dir, capsys):
    ck = tmp_path / "ck"
    assert main(["quantize", "--method", "rtn", "--model", str(tiny_model_dir), "--out", str(ck), "--group-size", "48"]) == 1
    err = capsys.readouterr().err
    assert "does not divide" in err and "Traceback" not in err and not ck.exists()
    assert main(["quantize", "--method", "rtn", "--model", str(tiny_model_dir), "--out", str(ck), "--group-size", "32"]) == 0
    assert main(["quantize", "--method", "rtn", "--model", str(tiny_model_dir), "--out", str(ck)]) == 1
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", str(ck), "--bits", "9"])
    assert "1..8" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing")]) == 1
    assert "not a folder" in capsys.readouterr().err
    assert main(["quantize", "--model", str(tmp_path / "no" / "such"), "--out", str(tmp_path / "x")]) == 1
    assert "no such model" in capsys.readouterr().err


def test_help_explains_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("demo", "quantize", "eval", "slice", "info"):
        assert cmd in out
    with pytest.raises(SystemExit):
        main(["quantize", "--help"])
    out = capsys.readouterr().out
    for opt in ("--group-size", "--slicing", "--scope", "--modules", "--bits-master", "--method"):
        assert opt in out


def test_info_shows_the_method_options_and_rotation(tmp_path, tiny_model_dir, capsys):
    ck = tmp_path / "ck"
    assert main(["quantize", "--method", "rtn", "--model", str(tiny_model_dir), "--out", str(ck), "--group-size", "32",
                 "--clip", "mse", "--rotate", "block"]) == 0
    capsys.readouterr()
    assert main(["info", str(ck)]) == 0
    out = capsys.readouterr().out
    assert "method options: clip=mse" in out
    assert "rotation: " in out and "block" in out
