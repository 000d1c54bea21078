"""GPTQ / MatGPTQ and the block-wise machinery, on tiny random models (fast)."""
from __future__ import annotations

import argparse

import pytest
import torch

from matquant.algorithms import quantize_model
from matquant.algorithms.blocks import capture_block_inputs, decoder_blocks, run_blockwise
from matquant.algorithms.gptq import gptq_quantize_weight, inverse_cholesky
from matquant.algorithms.hessian_pass import HessianAccumulator
from matquant.algorithms.matgptq import matgptq_quantize_weight
from matquant.algorithms.multislice_codes import BucketIndex, MultiSliceRounder, _tables, resolve_bits_lambdas
from matquant.format.checkpoint import load_checkpoint, save_checkpoint
from matquant.nn.bits import set_bits
from matquant.quant.minmax import QuantizedWeight, dequantize, dequantize_codes, quantize_minmax
from matquant.quant.slicing import slice_master


def tiny_llama(seed=0, layers=2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def calib_windows(n=4, seqlen=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, seqlen), generator=g)


def correlated_inputs(n=2048, d=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) * torch.linspace(0.05, 2.0, d)  # anisotropic, correlated features
    return torch.randn(n, d, generator=g) @ mix


def hessian(X):
    acc = HessianAccumulator()
    for chunk in X.split(500):
        acc.add(chunk)
    return acc.H


# ---------------------------------------------------------------- GPTQ math

def test_hessian_accumulator_is_2xtx_over_n():
    X = torch.randn(300, 16)
    assert torch.allclose(hessian(X), 2 * X.T @ X / 300, atol=1e-4)


@pytest.mark.parametrize("bits", [3, 4])
def test_gptq_beats_rtn_on_layer_output(bits):
    X = correlated_inputs()
    W = torch.randn(64, 128)
    qg, _ = gptq_quantize_weight(W, hessian(X), bits, 32, param_dtype=torch.float32)
    qr = quantize_minmax(W, bits, 32, param_dtype=torch.float32)
    err = lambda qw: ((X @ (W - dequantize(qw)).T) ** 2).mean().item()  # noqa: E731
    assert qg.bits == bits and qg.codes.max() <= 2**bits - 1
    assert err(qg) < 0.8 * err(qr)


def test_gptq_act_order_and_symmetric_run_and_beat_rtn():
    X = correlated_inputs(seed=3)
    W = torch.randn(32, 128)
    H = hessian(X)
    err = lambda qw: ((X @ (W - dequantize(qw)).T) ** 2).mean().item()  # noqa: E731
    for sym in (False, True):
        qa, _ = gptq_quantize_weight(W, H, 4, 32, symmetric=sym, act_order=True, param_dtype=torch.float32)
        qr = quantize_minmax(W, 4, 32, symmetric=sym, param_dtype=torch.float32)
        assert err(qa) < err(qr)


def test_gptq_dead_inputs_zero_their_columns():
    X = correlated_inputs(n=512, d=64)
    X[:, [3, 40]] = 0  # inputs that never fire: H_ii = 0
    W = torch.randn(16, 64)
    qw, loss = gptq_quantize_weight(W, hessian(X), 4, 32, param_dtype=torch.float32)
    Wq = dequantize(qw)
    assert torch.isfinite(Wq).all() and loss == loss
    step = qw.scales.float().max()
    assert Wq[:, [3, 40]].abs().max() <= step  # zeroed, then rounded to the code nearest 0


def test_inverse_cholesky_singular_hessian_raises_damping_then_fails_clearly():
    x = torch.randn(100, 1)
    H = hessian(torch.cat([x, x, x], 1))  # rank 1: singular without damping
    U = inverse_cholesky(H, 0.0)
    assert torch.isfinite(U).all()
    with pytest.raises(ValueError, match="damping must be >= 0"):
        inverse_cholesky(H, -1.0)
    with pytest.raises(ValueError, match="singular"):
        inverse_cholesky(torch.full((4, 4), float("nan")), 0.01, "model.layers.0.mlp.up_proj")


# ---------------------------------------------------------------- MatGPTQ code search

def brute_force_codes(w, scale, zero, c, bits, lam, mode):
    """Exhaustive search with the library's own slicing and dequantization, one code at a time."""
    best, best_q = None, None
    for q in range(2**c):
        codes = torch.full_like(w, q, dtype=torch.int32)
        err = sum(l * (w - dequantize_codes(slice_master(codes, c, r, mode), scale, zero)) ** 2
                  for r, l in zip(bits, lam))
        if best is None:
            best, best_q = err, torch.zeros_like(codes)
        else:
            better = err < best
            best = torch.where(better, err, best)
            best_q = torch.where(better, codes, best_q)
    return best_q


@pytest.mark.parametrize("mode", ["paper", "nested", "extra"])
@pytest.mark.parametrize("c,bits,lam", [(8, (8, 4, 2), (0.1, 0.1, 1.0)), (6, (6, 3, 2), (1.0, 1.0, 1.0)),
                                        (4, (4, 2, 1), (0.3, 1.0, 0.5))])
def test_matgptq_code_search_is_the_exact_argmin(mode, c, bits, lam):
    g = torch.Generator().manual_seed(c)
    w = torch.randn(6, 32, generator=g, dtype=torch.float64)
    qw = quantize_minmax(w.float(), c, 16, param_dtype=torch.float32)
    scale, zero = qw.scales.double(), qw.zeros.double()
    w = w * 1.2  # some weights outside the group range: the search must clamp correctly
    ref = brute_force_codes(w, scale, zero, c, bits, lam, mode)
    rounder = MultiSliceRounder(c, bits, lam, mode)
    u = (w.reshape(6, 2, 16) / scale[..., None] + zero[..., None]).reshape(6, 32)
    got = rounder.codes(u)
    # ties (equal error for two codes) are measure-zero for random data; compare the errors to be safe
    obj = lambda q: sum(lr * (u - slice_master(q, c, r, mode)) ** 2 for r, lr in zip(bits, lam))  # noqa: E731
    assert torch.allclose(obj(got), obj(ref.long()), atol=1e-3)
    assert (got == ref).float().mean() > 0.99
    _, A, B = _tables(c, rounder.bits, rounder.lam, mode)  # the exhaustive argmin over all 2^c codes
    assert torch.equal(got, (B - 2 * u.unsqueeze(-1).double() * A).argmin(-1))


@pytest.mark.parametrize("mode", ["paper", "nested", "extra"])
@pytest.mark.parametrize("c,bits,lam", [(8, None, None), (8, (8, 4, 2), (16.0, 4.0, 1.0)), (3, (3, 2), (0.0, 1.0))])
def test_bucket_index_equals_searchsorted_at_and_around_every_breakpoint(mode, c, bits, lam):
    r = MultiSliceRounder(c, bits, lam, mode)
    brk = r._brk
    g = torch.Generator().manual_seed(c)
    b32 = brk.float()
    u = torch.cat([torch.randn(50_000, generator=g) * 2**c, torch.rand(50_000, generator=g) * (2**c + 4) - 2,
                   b32, b32.nextafter(torch.tensor(1e30)), b32.nextafter(torch.tensor(-1e30)),
                   torch.tensor([float("inf"), -float("inf"), float("nan"), 1e30, -1e30])])
    idx = BucketIndex(brk)
    assert idx.steps <= BucketIndex.MAX_STEPS
    assert torch.equal(idx(u), torch.searchsorted(brk, u.double()))
    ud = torch.cat([brk, brk + 1e-12, brk - 1e-12])  # float64 inputs too
    assert torch.equal(idx(ud), torch.searchsorted(brk, ud))
    for tiny in (torch.tensor([], dtype=torch.float64), torch.tensor([0.5], dtype=torch.float64),
                 torch.tensor([1.0, 1.0 + 1e-9, 7.0], dtype=torch.float64)):  # empty, one, clustered breakpoints
        assert torch.equal(BucketIndex(tiny)(u), torch.searchsorted(tiny, u.double()))


def test_matgptq_rounder_single_precision_is_round_to_nearest():
    r = MultiSliceRounder(4, (4,), (1.0,), "paper")
    u = torch.linspace(-3, 18, 999, dtype=torch.float64)
    expect = torch.floor(u + 0.5).clamp(0, 15).long()
    off_tie = (u - u.floor() - 0.5).abs() > 1e-9
    assert torch.equal(r.codes(u)[off_tie], expect[off_tie])


def test_matgptq_feedback_values():
    u = torch.tensor([37.3, 200.2])
    for fb in ("weighted", "mean", "master"):
        r = MultiSliceRounder(8, (8, 4, 2), (0.1, 0.1, 1.0), "nested", fb)
        q, v = r.round(u, torch.ones(2), torch.zeros(2))
        S = torch.stack([slice_master(q, 8, b, "nested") for b in (8, 4, 2)])
        want = {"weighted": (torch.tensor([[0.1], [0.1], [1.0]]) * S).sum(0) / 1.2, "mean": S.mean(0),
                "master": q.float()}[fb]
        assert torch.allclose(v, want, atol=1e-5)


def test_matgptq_low_slices_beat_sliced_gptq():
    X = correlated_inputs(seed=5)
    W = torch.randn(64, 128)
    H = hessian(X)
    err = lambda qw, r, mode: ((X @ (W - dequantize(qw, r, mode)).T) ** 2).mean().item()  # noqa: E731
    g8, _ = gptq_quantize_weight(W, H, 8, 32, param_dtype=torch.float32)
    for mode in ("paper", "nested"):
        m8, _ = matgptq_quantize_weight(W, H, MultiSliceRounder(8, (8, 4, 2), (0.1, 0.1, 1.0), mode), 32,
                                        param_dtype=torch.float32)
        assert err(m8, 2, mode) < err(g8, 2, mode)
        assert err(m8, 8, mode) < err(m8, 2, mode)
        mx, _ = matgptq_quantize_weight(W, H, MultiSliceRounder(8, (8, 4, 2), (0.1, 0.1, 1.0), mode, "master"), 32,
                                        param_dtype=torch.float32)
        assert err(mx, 8, mode) < 2 * err(g8, 8, mode)  # int-c feedback: int8 as good as GPTQ int8


def test_group_param_search_never_worse_than_minmax_on_its_objective():
    W = torch.randn(32, 128)
    H = torch.eye(128)  # identity Hessian: no feedback across columns, pure per-weight objective
    rounder = MultiSliceRounder(8, (8, 4, 2), (0.1, 0.1, 1.0), "paper")

    def obj(qw):
        return sum(l * ((W - dequantize(qw, r, "paper")) ** 2).sum() for r, l in zip((8, 4, 2), (0.1, 0.1, 1.0)))

    mm, _ = matgptq_quantize_weight(W, H, rounder, 32, param_dtype=torch.float32, group_params="minmax")
    se, _ = matgptq_quantize_weight(W, H, rounder, 32, param_dtype=torch.float32, group_params="search")
    assert obj(se) <= obj(mm) * 1.0001


def test_bits_lambdas_validation():
    assert resolve_bits_lambdas(8) == ((8, 4, 3, 2), (16.0, 4.0, 2.0, 1.0))
    assert resolve_bits_lambdas(8, [8, 4, 2]) == ((8, 4, 2), (16.0, 4.0, 1.0))
    assert resolve_bits_lambdas(6) == ((6, 4, 3, 2), (1.0, 1.0, 1.0, 1.0))  # default R cut to the master
    assert resolve_bits_lambdas(3)[0] == (3, 2)
    assert resolve_bits_lambdas(8, [8, 3]) == ((8, 3), (1.0, 1.0))
    with pytest.raises(ValueError, match="exceeds the master bits"):
        resolve_bits_lambdas(4, [8, 4])
    with pytest.raises(ValueError, match="one weight per precision"):
        resolve_bits_lambdas(8, [8, 4, 2], [1.0, 1.0])
    with pytest.raises(ValueError, match="error feedback"):
        MultiSliceRounder(8, error_feedback="median")


# ---------------------------------------------------------------- block-wise machinery

def _tiny(arch):
    import transformers as T

    torch.manual_seed(0)
    small = dict(vocab_size=256)
    if arch == "llama":
        return tiny_llama()
    if arch == "qwen2":
        cfg = T.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, **small)
        return T.Qwen2ForCausalLM(cfg).eval()
    if arch == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, **small)).eval()
    if arch == "opt":
        cfg = T.OPTConfig(hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                          word_embed_proj_dim=64, max_position_embeddings=64, **small)
        return T.OPTForCausalLM(cfg).eval()
    raise AssertionError(arch)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "opt"])
def test_blockwise_inputs_match_the_full_forward(arch):
    model = _tiny(arch)
    calib = calib_windows(n=3, seqlen=16)
    with torch.no_grad():
        ref = model(input_ids=calib, output_hidden_states=True).hidden_states
    seen = {}
    _, blocks = decoder_blocks(model)

    def cb(ctx):
        seen[ctx.index] = torch.cat([h.cpu() for h in ctx.hidden])

    from matquant.models.targets import find_targets

    targets = find_targets(model, "ffn")
    run_blockwise(model, calib, targets, cb, device="cpu", batch_size=2, progress=False)
    assert sorted(seen) == list(range(len(blocks)))
    for i in range(len(blocks)):
        assert torch.allclose(seen[i], ref[i], atol=1e-5), f"block {i} inputs differ"
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "opt"])
def test_gptq_runs_on_other_architectures(arch):
    model = _tiny(arch)
    calib = calib_windows(n=2, seqlen=16)
    qc = quantize_model(model, "matgptq", calib=calib, scope="ffn+attn", group_size=32, progress=False)
    set_bits(model, 2)
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=calib).logits).all()
    assert qc.method == "matgptq"


def test_true_sequential_groups_llama():
    model = tiny_llama(layers=1)
    calib = calib_windows(n=1, seqlen=8)
    hidden, args = capture_block_inputs(model, calib, "cpu")
    from matquant.algorithms.blocks import BlockContext
    from matquant.models.targets import find_targets

    targets = find_targets(model, "ffn+attn")
    mods = dict(model.named_modules())
    ctx = BlockContext(0, "model.layers.0", model.model.layers[0], {t: mods[t] for t in targets}, hidden, args[0],
                       torch.device("cpu"))
    leaf = [[n.rsplit(".", 1)[1] for n in g] for g in ctx.input_groups()]
    assert leaf == [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


# ---------------------------------------------------------------- end to end through quantize_model

@pytest.mark.parametrize("method,kw", [("gptq", {"master_bits": 4}),
                                       ("matgptq", {"slicing": "nested", "error_feedback": "mean",
                                                    "bits_list": [8, 4, 2], "lambdas": [0.1, 0.1, 1.0]})])
def test_checkpoint_roundtrip(tmp_path, method, kw):
    model = tiny_llama()
    calib = calib_windows()
    qc = quantize_model(model, method, calib=calib, scope="ffn+attn", group_size=32, progress=False, **kw)
    assert qc.method == method and qc.master_bits == kw.get("master_bits", 8)
    if method == "matgptq":
        assert qc.method_args["error_feedback"] == "mean" and qc.method_args["bits_list"] == [8, 4, 2]
    bits = 2 if method == "matgptq" else 4
    set_bits(model, bits)
    x = calib_windows(n=2, seed=9)
    with torch.no_grad():
        want = model(input_ids=x).logits
    save_checkpoint(model, None, tmp_path / "ck", qc)
    loaded, _, _ = load_checkpoint(tmp_path / "ck", bits=bits)
    with torch.no_grad():
        got = loaded(input_ids=x).logits
    assert torch.allclose(got, want, atol=1e-5)


def test_gptq_improves_tiny_model_output_over_rtn():
    """End to end on the calibration windows themselves (what GPTQ minimises layer by layer), 3 bits."""
    calib = calib_windows(n=16, seqlen=32)
    ref = tiny_llama()
    with torch.no_grad():
        want = ref(input_ids=calib).logits
    errs = {}
    for method in ("rtn", "gptq"):
        m = tiny_llama()
        quantize_model(m, method, calib=calib if method == "gptq" else None, master_bits=3, scope="ffn+attn",
                       group_size=32, progress=False)
        with torch.no_grad():
            errs[method] = ((m(input_ids=calib).logits - want) ** 2).mean().item()
    assert errs["gptq"] < errs["rtn"]


# ---------------------------------------------------------------- bad input

def test_needs_calibration():
    with pytest.raises(ValueError, match="needs calibration data"):
        quantize_model(tiny_llama(), "gptq", progress=False)


@pytest.mark.parametrize("calib", [torch.randn(2, 8), torch.randint(0, 9, (8,)), torch.zeros(0, 8, dtype=torch.long)])
def test_bad_calibration_tensor(calib):
    with pytest.raises(ValueError, match="calibration data"):
        quantize_model(tiny_llama(), "matgptq", calib=calib, progress=False, group_size=32)


def test_nan_activations_clear_error():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].post_attention_layernorm.weight[5] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN/Inf activations at the input of model.layers.1.mlp"):
        quantize_model(model, "gptq", calib=calib_windows(), progress=False, group_size=32)


def test_dead_input_channel_end_to_end():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].post_attention_layernorm.weight[[2, 17]] = 0  # gate/up inputs 2, 17 always zero
    quantize_model(model, "matgptq", calib=calib_windows(), progress=False, group_size=32, master_bits=8)
    up = model.model.layers[0].mlp.up_proj
    w = dequantize(up.quantized_weight(), 8)
    assert torch.isfinite(w).all()
    assert w[:, [2, 17]].abs().max() <= up.scales.float().max()


def test_calibration_text_shorter_than_one_window(tmp_path):
    from matquant.algorithms import Calibration, make_config

    class Tok:
        name_or_path = "toy"

        def __len__(self):
            return 10

        def __call__(self, text, return_tensors=None, add_special_tokens=False):
            class R:
                input_ids = torch.arange(len(text.split()))[None]
            return R()

    f = tmp_path / "short.txt"
    f.write_text("only a few words here")
    with pytest.raises(ValueError, match="calibration text too short.*--calib-seqlen"):
        Calibration(text=str(f), windows=4, seqlen=512).token_windows(Tok(), make_config("gptq"))


def test_cli_method_flags_flow_into_the_method():
    from matquant.cli import build_parser
    from matquant.commands.quantize import config_from_args

    def config(*argv):
        return config_from_args(build_parser().parse_args(["quantize", "--out", "x", *argv]))[0]

    c = config("--method", "matgptq", "--bits-list", "8,4,3,2", "--lambdas", "0.1,0.1,0.5,1", "--damp", "0.05",
               "--act-order", "--error-feedback", "mean", "--group-params", "search")
    kw = c.method_kwargs()
    assert kw["bits_list"] == [8, 4, 3, 2] and kw["lambdas"] == [0.1, 0.1, 0.5, 1.0]
    assert kw["damp"] == 0.05 and kw["act_order"] and kw["error_feedback"] == "mean"
    assert kw["group_params"] == "search"
    assert "bits_list" not in config("--method", "gptq").method_kwargs()
    assert "damp" not in config("--method", "rtn").method_kwargs()


def test_quantized_weight_type():
    W, H = torch.randn(8, 32), torch.eye(32)
    qw, _ = gptq_quantize_weight(W, H, 8, 16)
    assert isinstance(qw, QuantizedWeight) and qw.codes.dtype == torch.uint8 and qw.scales.dtype == torch.float16


def test_input_groups_not_fooled_by_recycled_memory():
    """Layers fed different tensors are separate groups even when the allocator reuses the first one's memory.

    Whether the memory is reused depends on the allocator and the size, so several sizes are tried (at least some of
    them recycle on glibc; a grouping by bare data_ptr() failed this test).
    """
    from matquant.algorithms.blocks import BlockContext

    class Block(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.a, self.b = torch.nn.Linear(d, d), torch.nn.Linear(d, d)

        def forward(self, x):
            y = self.a(x * 2)  # the temporary x*2 is freed as soon as a returns...
            return self.b(x * 3) + y  # ...and x*3, same size, may land on the same memory

    for d in (16, 64, 128, 256):
        for s in (1, 8, 64):
            block = Block(d)
            ctx = BlockContext(0, "blk", block, {"a": block.a, "b": block.b}, [torch.randn(1, s, d)], [((), {})],
                               torch.device("cpu"))
            assert ctx.input_groups() == [["a"], ["b"]], (d, s)


def test_matgptq_propagate_options():
    """What later layers see during the pass changes the codes of later layers (never the first layer's, which only
    ever sees full-precision inputs) and never the format."""
    calib = calib_windows(n=2, seqlen=16)
    codes = {}
    for propagate in ("master", "fp", 4):
        model = tiny_llama(layers=2)
        qc = quantize_model(model, "matgptq", calib=calib, scope="ffn", group_size=32, progress=False,
                            propagate=propagate)
        assert qc.method_args.get("propagate", "master") == propagate  # recorded where it is not the default
        set_bits(model, 4)
        with torch.no_grad():
            assert torch.isfinite(model(input_ids=calib).logits).all()
        codes[propagate] = {n: model.get_submodule(n).qweight.clone() for n in qc.modules}
    first, last = "model.layers.0.mlp.gate_proj", "model.layers.1.mlp.down_proj"
    assert all(torch.equal(c[first], codes["master"][first]) for c in codes.values())
    assert not torch.equal(codes["master"][last], codes["fp"][last])
    assert not torch.equal(codes["master"][last], codes[4][last])
    assert not torch.equal(codes["fp"][last], codes[4][last])


def test_matgptq_propagate_fn():
    """propagate='fp' keeps the fp weight in place; 'master' / the master bits mean the default; bad values fail."""
    from matquant.algorithms.matgptq import propagate_fn

    with pytest.raises(ValueError, match="propagate must be"):
        propagate_fn("int4", 8, "nested")
    with pytest.raises(ValueError, match="propagate must be"):
        propagate_fn(9, 8, "nested")
    assert propagate_fn("master", 8, "nested") is None and propagate_fn(8, 8, "nested") is None
    W = torch.randn(4, 8)
    assert propagate_fn("fp", 8, "nested")(None, W) is W
