"""matquant.load on the packed CPU runtime: packed at load, keep / keep_master=False semantics, budget loading,
and `matquant generate` on a tiny checkpoint."""
import shutil

import pytest
import torch

import matquant
from matquant.algorithms import quantize_model
from matquant.cli import main
from matquant.format.checkpoint import save_checkpoint
from matquant.kernels import cpu_packed
from matquant.nn.memory import quantized_resident_bytes, resident_bytes

from conftest import tiny_rtn_checkpoint

pytestmark = pytest.mark.skipif(not cpu_packed.available(), reason="torch has no CPU int4 kernel")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_rtn_checkpoint(tmp_path_factory, "rt")


IDS = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(0))


def logits(m):
    with torch.no_grad():
        return m(IDS).logits


def _close(a, b, tol=3e-2):
    assert (a - b).abs().max().item() <= tol * b.abs().max().item()


def test_load_packs_at_load_time_and_matches_reference(ckpt):
    ref, _ = matquant.load(ckpt, bits=4, backend="torch")
    m, _ = matquant.load(ckpt, bits=4)
    layers = matquant.nn.matquant_modules(m).values()
    assert all(lay.backend == "auto" and lay.compute_backend.resident_precisions() == [(4, "nested")] for lay in layers)
    _close(logits(m), logits(ref))


def test_keep_master_false_holds_only_the_packed_slices(ckpt):
    full, _ = matquant.load(ckpt, bits=4)
    m, _ = matquant.load(ckpt, bits=4, keep_master=False)
    q_full, q_drop = quantized_resident_bytes(full), quantized_resident_bytes(m)
    n_weights = sum(lay.out_features * lay.in_features for lay in matquant.nn.matquant_modules(m).values())
    # int4 codes (4 bits) + bf16 scale and zero per group of 32 (1 bit) + the fp32 biases (none here)
    assert q_drop * 8 / n_weights == pytest.approx(5.0, abs=0.01)
    # keep_master=True holds the master as two packed planes (8 bits/weight) and the int4 slice IS the hi plane:
    # on top of the int4-only model it costs the lo plane (4 bits) + the fp16 scales and zeros
    assert all(lay.master_planes is not None for lay in matquant.nn.matquant_modules(full).values())
    assert q_full - q_drop == n_weights // 2 + n_weights // 32 * 4
    ref, _ = matquant.load(ckpt, bits=4, backend="torch")
    _close(logits(m), logits(ref))
    before = logits(m)
    with pytest.raises(ValueError, match="keep_master=False.*int4 \\(nested\\)"):
        matquant.set_bits(m, 2)
    assert matquant.get_bits(m) == dict.fromkeys(matquant.get_bits(m), 4)  # a failed switch changes nothing
    torch.testing.assert_close(logits(m), before)
    with pytest.raises(ValueError, match="master codes were dropped"):
        matquant.set_backend(m, "torch")
    with pytest.raises(ValueError, match="master codes were dropped"):
        m.load_state_dict(full.state_dict())


def test_keep_lists_the_switchable_precisions(ckpt):
    m, _ = matquant.load(ckpt, bits=4, keep=[8, 4], keep_master=False)
    ref8, _ = matquant.load(ckpt, bits=8, backend="torch")
    ref4, _ = matquant.load(ckpt, bits=4, backend="torch")
    for b, ref in ((8, ref8), (4, ref4), (8, ref8)):
        matquant.set_bits(m, b)
        _close(logits(m), logits(ref))
    with pytest.raises(ValueError, match="cannot switch to int3"):
        matquant.set_bits(m, 3)


def test_budget_picks_a_map_that_fits_and_is_measured(ckpt):
    m4, _ = matquant.load(ckpt, bits=4, keep_master=False, quantize_embeddings=True)  # as a budget= load holds them
    m8, _ = matquant.load(ckpt, bits=8, keep_master=False, quantize_embeddings=True)
    lo, hi = resident_bytes(m4), resident_bytes(m8)
    budget = (lo + hi) // 2
    m, _ = matquant.load(ckpt, budget=f"{budget}B")
    info = m.matquant_budget
    assert info["measured_bytes"] == resident_bytes(m) == info["predicted_bytes"] <= budget
    assert set(info["bits_map"].values()) == {4, 8}  # a real mix
    assert matquant.get_bits(m) == info["bits_map"]
    big, _ = matquant.load(ckpt, budget="1GB")
    assert set(matquant.get_bits(big).values()) == {8}
    from matquant.kernels import lowbit

    if lowbit.available():  # below every layer at int4: int2/int3 where the low-bit format is smaller
        small, _ = matquant.load(ckpt, budget=f"{lo - 1}B")
        assert min(small.matquant_budget["bits_map"].values()) < 4
    else:
        with pytest.raises(ValueError, match="below the smallest model the packed CPU runtime can hold"):
            matquant.load(ckpt, budget=f"{lo - 1}B")
    with pytest.raises(ValueError, match="below the smallest model the packed CPU runtime can hold"):
        matquant.load(ckpt, budget="1KB")
    with pytest.raises(ValueError, match="average bits is below"):
        matquant.load(ckpt, budget="1.0")


def test_generate_cli_on_a_tiny_checkpoint(ckpt, tiny_model_dir, capsys):
    assert main(["generate", str(ckpt), "--bits", "4", "--prompt", "The quick brown", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "prefill: " in out and "decode: 4 tokens" in out and "RSS after load" in out
    assert main(["generate", str(ckpt), "--budget", "10MB", "--prompt", "fox", "--max-new-tokens", "3",
                 "--temperature", "0.7", "--top-p", "0.9", "--seed", "1"]) == 0
    assert "budget 10MB" in capsys.readouterr().out
    bits_map = ckpt.parent / "map.json"
    bits_map.write_text('{"model.layers.0.*": 8, "model.layers.1.*": 2}')
    assert main(["generate", str(ckpt), "--bits-map", str(bits_map), "--prompt", "fox", "--max-new-tokens", "2"]) == 0
    assert "5.00 average bits" in capsys.readouterr().out
    assert main(["generate", "--model", str(tiny_model_dir), "--prompt", "dog", "--max-new-tokens", "2"]) == 0
    assert "full precision" in capsys.readouterr().out
    assert main(["generate", str(ckpt), "--model", str(tiny_model_dir), "--prompt", "x"]) == 1
    assert "not both" in capsys.readouterr().err


def test_greedy_generation_is_deterministic(ckpt):
    from matquant.commands.generate import build_inputs, generate

    m, tok = matquant.load(ckpt, bits=4)
    ids, mask = build_inputs(tok, "The quick brown")
    a = generate(m, tok, ids, mask, max_new_tokens=5, stream=False)
    b = generate(m, tok, ids, mask, max_new_tokens=5, stream=False)
    assert a["text"] == b["text"] and a["new_tokens"] == 5 and a["decode_tok_s"] > 0


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile's CPU backend needs a C++ compiler")
def test_compiled_decode_gives_the_eager_tokens_and_fixes_the_precision(ckpt):
    """compile_decode (static KV cache + torch.compile) must not change what greedy decoding produces, and must
    refuse a precision switch (the compiled graph captured the packed slices)."""
    from matquant.commands.generate import build_inputs, generate
    from matquant.nn.compiled import compile_decode, is_compiled

    m, tok = matquant.load(ckpt, bits=4)
    ids, mask = build_inputs(tok, "The quick brown")
    eager = generate(m, tok, ids, mask, max_new_tokens=4, stream=False)
    assert compile_decode(m) is m and is_compiled(m) and compile_decode(m) is m  # idempotent
    compiled = generate(m, tok, ids, mask, max_new_tokens=4, stream=False)
    assert compiled["text"] == eager["text"] and compiled["new_tokens"] == 4
    with pytest.raises(ValueError, match="compiled for decoding"):
        matquant.set_bits(m, 2)
    with pytest.raises(ValueError, match="generation_config"):
        compile_decode(torch.nn.Linear(2, 2))


def test_budget_below_every_layer_int4_uses_the_low_bit_slices(tmp_path):
    """With the low-bit kernel, a byte budget between every layer at int2 and every layer at int4 picks a map on
    (2, 3, 4) whose resident bytes are predicted exactly; above int4 the ladder stays (4, 8)."""
    import _tiny
    import transformers as T

    from matquant.kernels import lowbit

    if not lowbit.available():
        pytest.skip("the low-bit kernel could not be built here")
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=256,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)).eval()
    qcfg = quantize_model(model, "rtn", group_size=64, scope="ffn+attn", slicing="nested")
    save_checkpoint(model, _tiny.bpe_tokenizer(320, 40), tmp_path / "ck", qcfg)
    m2, _ = matquant.load(tmp_path / "ck", bits=2, keep_master=False, quantize_embeddings=True)
    m4, _ = matquant.load(tmp_path / "ck", bits=4, keep_master=False, quantize_embeddings=True)
    lo, hi = resident_bytes(m2), resident_bytes(m4)
    assert lo < hi
    m, _ = matquant.load(tmp_path / "ck", budget=f"{(lo + hi) // 2}B")
    info = m.matquant_budget
    assert info["measured_bytes"] == resident_bytes(m) == info["predicted_bytes"] <= (lo + hi) // 2
    assert set(info["bits_map"].values()) <= {2, 3, 4} and min(info["bits_map"].values()) < 4
    above, _ = matquant.load(tmp_path / "ck", budget=f"{hi + 1}B")
    assert set(above.matquant_budget["bits_map"].values()) <= {4, 8}
    with pytest.raises(ValueError, match="every quantized layer at int2"):
        matquant.load(tmp_path / "ck", budget=f"{lo - 1}B")
