"""Which GGML type each quantized tensor of a slice becomes, and its raw GGML bytes (the per-tensor half of the
GGUF export; the file itself is written by `gguf_export`):

  levels of the slice <= 16 (r <= 4; `extra` r <= 3)  -> Q4_1, exact (d = A, m = B per 32-block; fp16 rounding)
  levels <= 32 (r = 5; `extra` r = 4)                  -> Q5_1, exact
  otherwise (r = 6, 7, 8)                              -> Q8_0, nearest (per-32 scale fitted to the slice)
  --k-quants, only for tensors whose rows (input width) are divisible by 256 (the others keep the type above,
  reported):
      r = 2 -> Q2_K, r = 4 -> Q4_K, r = 5 -> Q5_K: the slice's OWN codes, the K-quant's quantized sub-block scales
              and mins fitted to the slice's values (quant/kquant.py): 2.625 / 4.5 / 5.5 bits per weight instead
              of Q4_1's 5.0 / Q5_1's 6.0, at a small measured cost against the slice (docs/export.md);
      r = 6 -> Q6_K, r = 3 -> Q3_K: nearest (codes re-chosen: these K-quants are symmetric, our codes are not).

Exact types need the group size to be a multiple of 32 (a group is a whole number of blocks sharing d, m).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from matquant.integrations import gguf_blocks as gb
from matquant.integrations.export_slices import ExportError, SliceLayout, SliceTensor
from matquant.quant.kquant import encode_kquant, fit_kquant

K_QUANT_FOR_BITS = {6: "Q6_K", 5: "Q5_K", 4: "Q4_K", 3: "Q3_K", 2: "Q2_K"}
SAME_CODE_K_QUANTS = ("Q2_K", "Q4_K", "Q5_K")  # affine like our slices: the codes are kept, the parameters fitted
NEAREST_ENCODERS = {"Q8_0": gb.encode_q8_0, "Q6_K": gb.encode_q6_k, "Q3_K": gb.encode_q3_k}  # from the values alone


@dataclass
class TensorChoice:
    qtype: str
    exact: bool
    note: str = ""


def choose_type(st: SliceTensor | SliceLayout, k_quants: bool = False) -> TensorChoice:
    """The GGML type an r-bit slice is written as (see the module docstring), from its layout alone."""
    cols = st.shape[1]
    note = ""
    if k_quants and st.bits in K_QUANT_FOR_BITS and st.levels == 2**st.bits:
        if cols % gb.QK_K == 0 and st.group_size % 16 == 0:
            qtype = K_QUANT_FOR_BITS[st.bits]
            return TensorChoice(qtype, exact=False, note="same codes, fitted scales" if qtype in SAME_CODE_K_QUANTS
                                else "")
        note = (f"{K_QUANT_FOR_BITS[st.bits]} needs rows divisible by 256 (and groups of 16); this tensor's rows "
                f"are {cols} wide, written as ")
    if st.levels <= 32:
        qtype = "Q4_1" if st.levels <= 16 else "Q5_1"
        if st.group_size % gb.QK:
            raise ExportError(
                f"{st.module}: group size {st.group_size} is not a multiple of 32, so {qtype} (one d, m per "
                f"32-block) cannot hold the {st.bits}-bit slice exactly. Quantize with --group-size 32, 64, 128 "
                "or -1 (per channel) to export it to GGUF.")
        return TensorChoice(qtype, exact=True, note=note + f"{qtype} (exact)" if note else "")
    return TensorChoice("Q8_0", exact=False, note=note + "Q8_0 (nearest)" if note else "")


def encode_slice(st: SliceTensor, qtype: str, perm: np.ndarray | None = None) -> np.ndarray:
    """Raw GGML bytes [rows, bytes per row] of the slice in `qtype` (rows permuted by `perm` if given)."""
    codes, a, b = st.codes.numpy(), st.a.numpy(), st.b.numpy()
    values = st.reference.numpy()
    if perm is not None:
        codes, a, b, values = codes[perm], a[perm], b[perm], values[perm]
    if qtype in ("Q4_1", "Q5_1"):
        d, m = gb.group_to_blocks(a, st.group_size, gb.QK), gb.group_to_blocks(b, st.group_size, gb.QK)
        codes, m = gb.recentre_codes(codes, d, m, 15 if qtype == "Q4_1" else 31)
        return (gb.encode_q4_1 if qtype == "Q4_1" else gb.encode_q5_1)(codes, d, m)
    if qtype in NEAREST_ENCODERS:
        return NEAREST_ENCODERS[qtype](values)
    if qtype in SAME_CODE_K_QUANTS:  # the slice's codes, the format's parameters fitted to its values
        return encode_kquant(fit_kquant(qtype, codes, values))
    raise ExportError(f"no GGUF encoder for {qtype}")
