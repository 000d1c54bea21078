"""Fast precision switching of the packed CPU runtime: the master held as two packed planes (master_planes.MasterPlanes),
every nested slice cut from them by at most one AND, byte-identical to packing the slice from scratch; the layer
stays a normal MatQuantLinear (state_dict, .to, other backends, load_state_dict) and holds 8 bits/weight of master."""
import pytest
import torch

import matquant
from matquant.kernels import cpu_packed, lowbit, master_planes, torch_ref
from matquant.nn.linear import MatQuantLinear
from matquant.nn.memory import prepare_packed, quantized_resident_bytes, resident_bytes, resident_tensors
from matquant.quant.minmax import quantize_minmax

from conftest import tiny_model

pytestmark = pytest.mark.skipif(not cpu_packed.available(), reason="torch has no CPU int4 kernel")

SHAPES = [(48, 256, 64, True), (80, 96, 32, False), (32, 384, 128, True), (16, 576, 576, False)]


def _layer(out_f, in_f, group, bias, master_bits=8, seed=0):
    torch.manual_seed(seed)
    qw = quantize_minmax(torch.randn(out_f, in_f) * 0.05, master_bits, group)
    lin = MatQuantLinear.from_quantized(qw, torch.randn(out_f) * 0.1 if bias else None, slicing="nested")
    return qw, lin


def _same_slice(a: cpu_packed.PackedSlice, b: cpu_packed.PackedSlice):
    assert (a.bits, a.group, a.kind, len(a.parts)) == (b.bits, b.group, b.kind, len(b.parts))
    for (pa, sa), (pb, sb) in zip(a.parts, b.parts):
        assert torch.equal(pa, pb) and torch.equal(sa, sb)


def test_packing_permutes_raw_nibbles_on_this_build():
    assert master_planes.planes_supported()
    q = torch.randint(0, 16, (112, 160), dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    p = cpu_packed.pack4(q)
    for m in range(16):  # every nibble mask, not only the top-bit ones the switch uses
        assert torch.equal(p & (m << 4 | m), cpu_packed.pack4(q & m))
    assert torch.equal(master_planes.unpack4(p, 112, 160), q.to(torch.uint8))


@pytest.mark.parametrize("master_bits", [8, 6, 4])
@pytest.mark.parametrize("out_f,in_f,group,bias", SHAPES)
def test_switch_from_planes_equals_packing_from_scratch(out_f, in_f, group, bias, master_bits):
    qw, _ = _layer(out_f, in_f, group, bias, master_bits)
    planes = master_planes.pack_master(qw.codes, master_bits)
    assert planes.nbytes == out_f * in_f * (2 if master_bits > 4 else 1) // 2
    assert torch.equal(master_planes.unpack_master(planes), qw.codes)
    for bits in range(2, master_bits + 1):
        fast = master_planes.nested_slice(planes, qw.scales, qw.zeros, bits, group)
        mode = "nested" if bits < master_bits else "paper"
        scratch = cpu_packed.pack_slice(qw.codes, qw.scales, qw.zeros, master_bits, bits, mode, group)
        _same_slice(fast, scratch)
        for like in (4, master_bits, 2):  # reusing another slice's r-independent scale columns changes nothing
            other = master_planes.nested_slice(planes, qw.scales, qw.zeros, min(like, master_bits), group)
            _same_slice(master_planes.nested_slice(planes, qw.scales, qw.zeros, bits, group, like=other), scratch)
        shared = {t.untyped_storage().data_ptr() for t in planes.tensors()}
        copies = [t for t, _ in fast.parts if t.untyped_storage().data_ptr() not in shared]
        assert len(copies) == (0 if master_planes.shares_planes(bits, master_bits) else 1)  # at most one AND


@pytest.mark.parametrize("out_f,in_f,group,bias", SHAPES)
def test_layer_switches_back_and_forth_from_its_planes(out_f, in_f, group, bias):
    qw, lin = _layer(out_f, in_f, group, bias)
    _, fresh = _layer(out_f, in_f, group, bias)  # same codes, master kept as uint8: packs every slice from scratch
    for m in (lin, fresh):
        m.set_backend("packed")
    lin.hold_master_packed()
    assert lin.qweight.is_meta and lin.master_planes is not None
    xs = [torch.randn(1, in_f), torch.randn(17, in_f)]
    for bits in (8, 2, 5, 4, 7, 3, 8, 6, 2, 4):
        for m in (lin, fresh):
            m.set_bits(bits)
        w = torch_ref.dequantize_slice(qw.codes, qw.scales, qw.zeros, 8, bits, "nested")
        for x in xs:
            y = lin(x)
            assert torch.equal(y, fresh(x))  # identical bytes and tables: identical outputs
            ref = x.bfloat16().float() @ w.t() + (lin.bias if bias else 0)
            err = (y - ref).abs().max().item()
            assert err <= (1.2e-2 if bits <= 4 else 2e-2) * ref.abs().max().item()
        assert lin.compute_backend.resident_precisions() == [(bits, "nested" if bits < 8 else "paper")]
        # memory: planes (8 bits) + at most one masked plane + tables + fp16 scales/zeros + bias; no dense weight
        n, k = out_f, in_f
        ps = lin.compute_backend.packed_slice(lin)
        if isinstance(ps, lowbit.LowbitSlice):  # int2/int3 at their own size (kernels/lowbit.py)
            expect = n * k + lowbit.slice_bytes(n, k, group, bits)
        else:
            tables = sum(t.numel() * 2 for _, t in ps.parts)
            expect = n * k + (0 if master_planes.shares_planes(bits, 8) else n * k // 2) + tables
        expect += 2 * qw.scales.numel() * 2 + (n * 4 if bias else 0)
        assert quantized_resident_bytes(lin) == expect
        assert not [t for _, t in resident_tensors(lin) if t.is_floating_point() and t.numel() >= n * k // 4]


def test_paper_slice_of_a_planes_layer_is_repacked_from_the_unpacked_codes():
    qw, lin = _layer(48, 256, 64, True)
    lin.set_backend("packed")
    lin.hold_master_packed()
    lin.set_bits(3, "paper")
    x = torch.randn(5, 256)
    w = torch_ref.dequantize_slice(qw.codes, qw.scales, qw.zeros, 8, 3, "paper")
    ref = x.bfloat16().float() @ w.t() + lin.bias
    assert (lin(x) - ref).abs().max() <= 1.2e-2 * ref.abs().max()
    assert lin.master_planes is not None and lin.qweight.is_meta  # the master stays packed


def test_planes_layer_is_still_a_normal_module():
    qw, lin = _layer(48, 256, 64, True)
    lin.set_backend("packed")
    lin.set_bits(4)
    x = torch.randn(3, 256)
    y4 = lin(x)
    lin.hold_master_packed()
    sd = lin.state_dict()
    assert torch.equal(sd["qweight"], qw.codes) and lin.qweight.is_meta  # unpacked on the fly for checkpoints
    torch.testing.assert_close(lin(x), y4, rtol=0, atol=0)
    lin.float()  # stays on CPU: the planes stay
    assert lin.master_planes is not None
    lin.to("cpu")
    assert lin.master_planes is not None and torch.equal(lin(x), y4)
    other = MatQuantLinear(256, 48, bias=True, group_size=64)
    other.set_backend("packed")
    other.hold_master_packed()
    other.load_state_dict(sd)  # restored, then loaded into
    assert other.master_planes is None and torch.equal(other.qweight, qw.codes)
    lin.set_backend("torch")  # the reference path reads uint8 codes: restored
    assert lin.master_planes is None and torch.equal(lin.qweight, qw.codes)
    with pytest.raises(ValueError, match="master codes were dropped"):
        dropped = _layer(48, 256, 64, True)[1]
        dropped.set_backend("packed")
        prepare_packed(torch.nn.Sequential(dropped))
        dropped.drop_master()
        dropped.hold_master_packed()


def test_load_holds_the_master_as_planes_and_switches_every_nested_precision(tmp_path):
    import _tiny
    from matquant.algorithms import quantize_model
    from matquant.format.checkpoint import save_checkpoint

    model = tiny_model("llama")
    qcfg = quantize_model(model, "rtn", group_size=32, scope="ffn+attn", slicing="nested")
    save_checkpoint(model, _tiny.bpe_tokenizer(320, 40), tmp_path / "ck", qcfg)
    m, _ = matquant.load(tmp_path / "ck", bits=4)
    ref, _ = matquant.load(tmp_path / "ck", bits=4, backend="torch")
    layers = matquant.nn.matquant_modules(m).values()
    assert all(lay.master_planes is not None and lay.qweight.is_meta for lay in layers)
    ids = torch.randint(0, 320, (1, 7), generator=torch.Generator().manual_seed(0))
    for b in (8, 2, 6, 3, 4):
        matquant.set_bits(m, b)
        matquant.set_bits(ref, b)
        with torch.no_grad():
            got, want = m(ids).logits, ref(ids).logits
        assert (got - want).abs().max() <= 3e-2 * want.abs().max(), b
        for lay in layers:
            assert not [t for _, t in resident_tensors(lay) if t.is_floating_point()
                        and t.numel() >= lay.out_features * lay.in_features // 4]
    # budget with keep_master=True: the runtime memory model counts the planes (predicted == measured)
    m4, _ = matquant.load(tmp_path / "ck", bits=4, keep_master=True, quantize_embeddings=True)  # as budget= does
    m8, _ = matquant.load(tmp_path / "ck", bits=8, keep_master=True, quantize_embeddings=True)
    budget = (resident_bytes(m4) + resident_bytes(m8)) // 2
    mixed, _ = matquant.load(tmp_path / "ck", budget=f"{budget}B", keep_master=True)
    info = mixed.matquant_budget
    assert info["measured_bytes"] == info["predicted_bytes"] <= budget
    assert set(info["bits_map"].values()) == {4, 8}
    # a save of the loaded model writes the uint8 codes: it reloads to the same logits
    from matquant.format.checkpoint import save_checkpoint as save

    save(m, _tiny.bpe_tokenizer(320, 40), tmp_path / "again", qcfg)
    again, _ = matquant.load(tmp_path / "again", bits=4, backend="torch")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref(ids).logits)
