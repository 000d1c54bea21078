"""Nested-exact packed layout: exact round trip, slices read from the planes equal the reference slicing."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matquant.kernels.packing import (
    BITPLANES, CHUNKS_DEFAULT, CHUNKS_EXACT, bits_read, pack_codes, slice_packed, unpack_codes,
)
from matquant.quant.slicing import slice_codes

LAYOUTS = [CHUNKS_DEFAULT, CHUNKS_EXACT, BITPLANES, (8,), (4, 4), (4, 2, 1, 1)]


@st.composite
def codes_and_layout(draw):
    n = draw(st.integers(1, 9))
    k = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    chunks = draw(st.sampled_from(LAYOUTS))
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (n, k), generator=g, dtype=torch.int32).to(torch.uint8)
    return codes, chunks


@settings(max_examples=150, deadline=None)
@given(codes_and_layout())
def test_round_trip_exact(cl):
    codes, chunks = cl
    packed = pack_codes(codes, chunks)
    assert packed.data.numel() == codes.shape[0] * packed.k_pad  # 8 bits per weight in total, no overhead
    assert torch.equal(unpack_codes(packed), codes)


@settings(max_examples=100, deadline=None)
@given(codes_and_layout(), st.integers(1, 8), st.sampled_from(["nested", "paper", "extra"]))
def test_slice_from_planes_matches_reference(cl, bits, mode):
    codes, chunks = cl
    packed = pack_codes(codes, chunks)
    assert torch.equal(slice_packed(packed, bits, mode), slice_codes(codes, 8, bits, mode))


def test_edge_codes_round_trip():
    codes = torch.tensor([[0, 255, 128, 127, 1, 254, 85, 170, 15]], dtype=torch.uint8)
    for chunks in LAYOUTS:
        assert torch.equal(unpack_codes(pack_codes(codes, chunks)), codes)


def test_bits_read_table():
    # the documented table: 2|2|4 is exact for nested 2/4/8; int3 reads 4 bits and int6 reads 8
    assert [bits_read(CHUNKS_DEFAULT, r, "nested") for r in (2, 3, 4, 6, 8)] == [2, 4, 4, 8, 8]
    assert [bits_read(CHUNKS_DEFAULT, r, "paper") for r in (2, 3, 4, 6, 8)] == [4, 4, 8, 8, 8]
    assert [bits_read(CHUNKS_EXACT, r, "nested") for r in (2, 3, 4, 6, 8)] == [2, 3, 4, 6, 8]
    assert [bits_read(CHUNKS_EXACT, r, "paper") for r in (2, 3, 4, 6, 8)] == [3, 4, 6, 8, 8]
    assert [bits_read(BITPLANES, r, "paper") for r in (2, 3, 4, 6, 8)] == [3, 4, 5, 7, 8]


def test_nbytes_read_is_prefix():
    codes = torch.randint(0, 256, (16, 64), dtype=torch.int32).to(torch.uint8)
    p = pack_codes(codes)
    assert p.nbytes_read(2) == 16 * 64 * 2 // 8
    assert p.nbytes_read(4) == 16 * 64 * 4 // 8
    assert p.nbytes_read(8) == p.data.numel()


@pytest.mark.parametrize("chunks", [(3, 5), (2, 2, 2), (), (16,)])
def test_bad_layout_is_one_clear_error(chunks):
    with pytest.raises(ValueError, match="chunk layout"):
        pack_codes(torch.zeros(2, 8, dtype=torch.uint8), chunks)


def test_bad_codes_error():
    with pytest.raises(ValueError, match="uint8"):
        pack_codes(torch.zeros(2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match="exceed 4 bits"):
        pack_codes(torch.full((2, 8), 200, dtype=torch.uint8), (2, 2), master_bits=4)
