"""Fast CPU path: equals the torch reference for every precision and slicing mode; the cache works."""
import pytest
import torch

from matquant.kernels import cpu, torch_ref
from matquant.quant.minmax import quantize_minmax


@pytest.fixture(scope="module")
def qw():
    torch.manual_seed(0)
    return quantize_minmax(torch.randn(37, 192), 8, 64)


@pytest.mark.parametrize("mode", ["paper", "nested", "extra"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_dequantize_matches_reference(qw, bits, mode):
    ref = torch_ref.dequantize_slice(qw.codes, qw.scales, qw.zeros, 8, bits, mode)
    fast = cpu.dequantize(qw.codes, qw.scales, qw.zeros, 8, bits, mode)
    torch.testing.assert_close(fast, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_linear_matches_reference(qw, dtype):
    x = torch.randn(5, 192).to(dtype)
    bias = torch.randn(37)
    for bits, mode in [(8, "paper"), (4, "nested"), (2, "paper"), (3, "nested")]:
        w = torch_ref.dequantize_slice(qw.codes, qw.scales, qw.zeros, 8, bits, mode, dtype)
        ref = torch_ref.linear(x, w, bias.to(dtype))
        got = cpu.linear(x, qw.codes, qw.scales, qw.zeros, 8, bits, mode, bias)
        torch.testing.assert_close(got, ref)


def test_weight_cache_per_precision(qw):
    cache = cpu.WeightCache(max_entries=3)
    x = torch.randn(2, 192)
    for bits in (8, 4, 2, 4):
        cpu.linear(x, qw.codes, qw.scales, qw.zeros, 8, bits, "nested", cache=cache)
    assert len(cache) == 3
    w4 = cache.get((4, "nested", torch.float32, x.device), lambda: pytest.fail("int4 should be cached"))
    torch.testing.assert_close(w4, torch_ref.dequantize_slice(qw.codes, qw.scales, qw.zeros, 8, 4, "nested"))
    cpu.linear(x, qw.codes, qw.scales, qw.zeros, 8, 3, "nested", cache=cache)
    assert len(cache) == 3  # oldest entry evicted
    none = cpu.WeightCache(max_entries=0)
    cpu.linear(x, qw.codes, qw.scales, qw.zeros, 8, 3, "nested", cache=none)
    assert len(none) == 0


def test_master_bits_below_8():
    torch.manual_seed(1)
    q4 = quantize_minmax(torch.randn(8, 64), 4, 32)
    for bits in (1, 2, 3, 4):
        for mode in ("paper", "nested"):
            torch.testing.assert_close(cpu.dequantize(q4.codes, q4.scales, q4.zeros, 4, bits, mode),
                                       torch_ref.dequantize_slice(q4.codes, q4.scales, q4.zeros, 4, bits, mode))


def test_bad_mode(qw):
    with pytest.raises(ValueError, match="slicing mode"):
        cpu.dequantize(qw.codes, qw.scales, qw.zeros, 8, 4, "round")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_blocking_matches_reference(qw, monkeypatch, dtype):
    monkeypatch.setattr(cpu, "BLOCK_ELEMENTS", 192 * 5)  # 5 rows per block, 37 rows: uneven last block
    for bits, mode in [(4, "paper"), (2, "nested"), (7, "paper")]:
        ref = torch_ref.dequantize_slice(qw.codes, qw.scales, qw.zeros, 8, bits, mode, dtype)
        torch.testing.assert_close(cpu.dequantize(qw.codes, qw.scales, qw.zeros, 8, bits, mode, dtype), ref)
