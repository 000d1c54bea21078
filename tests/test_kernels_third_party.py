"""Parameter mappings to GemLite / tinygemm equal the torch reference (CPU). The GPU-side adapters are untested."""
import pytest
import torch

from matquant.kernels import third_party as tp
from matquant.kernels import torch_ref
from matquant.quant.minmax import quantize_minmax


@pytest.fixture(scope="module")
def qw():
    torch.manual_seed(0)
    return quantize_minmax(torch.randn(48, 256) * 0.05, 8, 64)


@pytest.mark.parametrize("mode", ["paper", "nested"])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_gemlite_affine_form_matches_reference(qw, bits, mode):
    q, scale, zero = tp.gemlite_inputs(qw.codes, qw.scales, qw.zeros, 8, bits, mode, torch.float32)
    assert q.dtype == torch.uint8 and int(q.max()) < 2**bits
    w = ((q.float().view(48, 4, 64) - zero.unsqueeze(-1)) * scale.unsqueeze(-1)).view(48, 256)
    ref = torch_ref.dequantize_slice(qw.codes, qw.scales, qw.zeros, 8, bits, mode)
    torch.testing.assert_close(w, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"), reason="torch has no CPU int4 mm")
@pytest.mark.parametrize("mode", ["paper", "nested"])
def test_tinygemm_mapping_through_torch_cpu_int4_kernel(qw, mode):
    q4, sz = tp.tinygemm_int4_inputs(qw.codes, qw.scales, qw.zeros, 8, mode)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4, 2)
    x = torch.randn(3, 256).bfloat16()
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 64, sz).float()
    ref = x.float() @ torch_ref.dequantize_slice(qw.codes, qw.scales, qw.zeros, 8, 4, mode).t()
    torch.testing.assert_close(y, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def test_unsupported_inputs_are_clear_errors(qw):
    with pytest.raises(ValueError, match="'extra'"):
        tp.gemlite_inputs(qw.codes, qw.scales, qw.zeros, 8, 4, "extra")
    with pytest.raises(ValueError, match="Triton kernel"):
        tp.make_gemlite_linear(qw.codes, qw.scales, qw.zeros, 8, 3, "paper", 64)
