"""Hadamard constructions (quant/hadamard.py): exact orthogonality and fast == dense for the sizes LLMs use."""
import pytest
import torch

from matquant.quant.hadamard import apply_hadamard, hadamard_factors, hadamard_matrix, random_signs

SIZES = [1, 2, 4, 12, 20, 28, 36, 64, 76, 576, 896, 1536]  # SmolLM2: 576/1536; Qwen2.5-0.5B: 896 (4864 below)


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_is_exactly_orthogonal(n):
    h = hadamard_matrix(n)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n", [12, 64, 576, 896, 1536])
def test_fast_transform_equals_dense_and_inverts(n):
    x = torch.randn(5, n, dtype=torch.float64)
    h = hadamard_matrix(n) / n**0.5
    torch.testing.assert_close(apply_hadamard(x), x @ h.t(), rtol=0, atol=1e-12)
    torch.testing.assert_close(apply_hadamard(x, transpose=True), x @ h, rtol=0, atol=1e-12)
    torch.testing.assert_close(apply_hadamard(apply_hadamard(x), transpose=True), x, rtol=0, atol=1e-12)
    x32 = x.float().reshape(5, 1, n)  # any leading shape, fp32
    torch.testing.assert_close(apply_hadamard(x32), (x @ h.t()).float().reshape(5, 1, n), rtol=1e-5, atol=1e-5)


def test_factorisations_of_llm_sizes():
    assert hadamard_factors(576) == (12, 12, 4)
    assert hadamard_factors(4864) == (76, 64)
    assert hadamard_factors(4096) == (4096,)
    for n in (576, 896, 1536, 4864, 14336):
        assert max(f for f in hadamard_factors(n) if f & (f - 1)) <= 256  # dense factors stay small


def test_unconstructible_size_says_what_to_do():
    with pytest.raises(ValueError, match="block-diagonal"):
        hadamard_factors(11008)  # 256 · 43: no small Paley factor
    with pytest.raises(ValueError, match="positive"):
        hadamard_factors(0)


def test_random_signs_are_seeded():
    assert torch.equal(random_signs(64, 3), random_signs(64, 3))
    assert not torch.equal(random_signs(64, 3), random_signs(64, 4))
    assert set(random_signs(64, 3).tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("n", [4864, 14336])  # Qwen2.5-0.5B FFN, Llama-3-8B FFN: too big for a dense check in CI
def test_large_sizes_are_orthogonal_transforms(n):
    x = torch.randn(4, n, dtype=torch.float64)
    y = apply_hadamard(x)
    torch.testing.assert_close(y @ y.t(), x @ x.t(), rtol=1e-10, atol=1e-9)  # inner products preserved
    torch.testing.assert_close(apply_hadamard(y, transpose=True), x, rtol=0, atol=1e-11)
    e = torch.zeros(1, n, dtype=torch.float64)
    e[0, 123] = 1.0  # one column of H/√n: every entry is ±1/√n
    torch.testing.assert_close(apply_hadamard(e).abs(), torch.full((1, n), n**-0.5, dtype=torch.float64))
