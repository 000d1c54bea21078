"""The packed layout's promise: an r-bit slice needs only the first nbytes_read(r) bytes of the buffer."""
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from matquant.kernels.packing import BITPLANES, CHUNKS_DEFAULT, CHUNKS_EXACT, pack_codes, slice_packed
from matquant.quant.slicing import slice_codes

LAYOUTS = [CHUNKS_DEFAULT, CHUNKS_EXACT, BITPLANES, (8,), (4, 4), (4, 2, 1, 1)]


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 9), st.integers(1, 40), st.integers(0, 2**31 - 1), st.sampled_from(LAYOUTS),
       st.integers(1, 8), st.sampled_from(["nested", "paper", "extra"]))
def test_truncated_buffer_still_gives_the_slice(n, k, seed, chunks, bits, mode):
    codes = torch.randint(0, 256, (n, k), generator=torch.Generator().manual_seed(seed),
                          dtype=torch.int32).to(torch.uint8)
    packed = pack_codes(codes, chunks)
    cut = packed.nbytes_read(bits, mode)
    assert cut <= packed.data.numel()
    # only the prefix survives: the rest of the buffer is gone, not merely unread
    prefix = dataclasses.replace(packed, data=packed.data[:cut].clone())
    assert torch.equal(slice_packed(prefix, bits, mode), slice_codes(codes, 8, bits, mode))


@pytest.mark.parametrize("bits,mode", [(2, "nested"), (4, "nested"), (2, "paper")])
def test_prefix_is_needed_and_sufficient(bits, mode):
    """One byte less than nbytes_read(r) is not enough (the count is tight, not just safe)."""
    codes = torch.randint(0, 256, (4, 16), generator=torch.Generator().manual_seed(0),
                          dtype=torch.int32).to(torch.uint8)
    packed = pack_codes(codes, CHUNKS_DEFAULT)
    cut = packed.nbytes_read(bits, mode)
    short = dataclasses.replace(packed, data=packed.data[: cut - 1].clone())
    with pytest.raises(RuntimeError):
        slice_packed(short, bits, mode)
