"""Sharded checkpoints (HF layout: model-0000k-of-0000N.safetensors + model.safetensors.index.json) everywhere a
checkpoint is read: the same model as the single-file layout on both load paths and in `matquant info`; every
inconsistency between the index and the shards a one-line CheckpointError naming the fix; `matquant info` refusing
what `load` refuses; and `matquant.load(keep_master=False)` packing each layer as it is read, with the same result
as packing after a full load."""
import json
import shutil

import pytest
import torch

import matquant
from matquant.algorithms import quantize_model
from matquant.cli import main
from matquant.format.checkpoint import checkpoint_size_bytes, load_checkpoint, save_checkpoint
from matquant.format.config import CheckpointError
from matquant.format.folder import INDEX_NAME, looks_like_matquant
from matquant.format.shards import ShardWriter, TensorReader
from matquant.kernels import cpu_packed

from conftest import tiny_model

UP = "model.layers.0.mlp.up_proj.qweight"
IDS = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    import _tiny

    model = tiny_model("llama")
    qcfg = quantize_model(model, "rtn", group_size=32, scope="ffn+attn", slicing="nested", progress=False)
    root = tmp_path_factory.mktemp("shards")
    tok = _tiny.bpe_tokenizer(320, 40)
    save_checkpoint(model, tok, root / "single", qcfg)
    save_checkpoint(model, tok, root / "sharded", qcfg, max_shard_bytes=40_000)
    return root / "single", root / "sharded"


def _logits(m):
    with torch.no_grad():
        return m(IDS).logits


def _from_pretrained(d):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(d))


def test_sharded_checkpoint_is_the_same_model_on_every_path(ckpts, capsys):
    single, sharded = ckpts
    shards = sorted(p.name for p in sharded.glob("model-*.safetensors"))
    assert len(shards) > 2 and (sharded / INDEX_NAME).exists() and not (sharded / "model.safetensors").exists()
    assert not (single / INDEX_NAME).exists()
    index = json.loads((sharded / INDEX_NAME).read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert checkpoint_size_bytes(sharded) == sum((sharded / s).stat().st_size for s in shards)
    a, _, _ = load_checkpoint(single)
    b, _, _ = load_checkpoint(sharded)
    assert torch.equal(_logits(a), _logits(b))
    assert torch.equal(_logits(_from_pretrained(sharded)), _logits(a))
    assert looks_like_matquant(sharded)
    assert main(["info", str(sharded)]) == 0
    assert f"in {len(shards)} shards" in capsys.readouterr().out


def test_single_file_save_is_one_file_and_reads_back_bit_exact(ckpts):
    single, _ = ckpts
    r = TensorReader(single)
    assert r.files() == ["model.safetensors"] and r.get(UP).dtype == torch.uint8
    m, _, _ = load_checkpoint(single)
    assert torch.equal(m.get_submodule(UP.rsplit(".", 1)[0]).qweight, r.get(UP))


def test_shard_writer_respects_the_size_and_names_files_like_hf(tmp_path):
    w = ShardWriter(tmp_path, max_shard_bytes=100)
    for i in range(5):
        w.add(f"t{i}", torch.zeros(10, dtype=torch.float32))  # 40 bytes each: two per shard
    wm = w.close()
    assert sorted(set(wm.values())) == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    r = TensorReader(tmp_path)
    assert sorted(r.names()) == [f"t{i}" for i in range(5)] and r.shape("t4") == (10,)
    assert not list(tmp_path.glob(".shard-*"))


def _idx(d, fn):
    p = d / INDEX_NAME
    j = json.loads(p.read_text())
    fn(j["weight_map"])
    p.write_text(json.dumps(j))


def _shard_of(d, name=UP):
    return d / json.loads((d / INDEX_NAME).read_text())["weight_map"][name]


def _other_shard(d, name=UP):
    return next(p.name for p in sorted(d.glob("model-*.safetensors")) if p != _shard_of(d, name))


def _link_out(d):
    s = _shard_of(d)
    outside = d.parent / f"outside-{d.name}.safetensors"
    shutil.copyfile(s, outside)
    s.unlink()
    s.symlink_to(outside)


def _copy_into_other_shard(d):
    from safetensors.torch import load_file, save_file

    other = d / _other_shard(d)
    sd = load_file(str(other))
    sd[UP] = load_file(str(_shard_of(d)))[UP]
    save_file(sd, str(other), metadata={"format": "pt"})


def _wrong_shape(d):
    from safetensors.torch import load_file, save_file

    s = _shard_of(d)
    sd = load_file(str(s))
    sd[UP] = sd[UP][:, :32].contiguous()
    save_file(sd, str(s), metadata={"format": "pt"})


def _set(wm, name, shard):
    wm[name] = shard


def _no_metadata(d):
    (d / INDEX_NAME).write_text(json.dumps({"weight_map": json.loads((d / INDEX_NAME).read_text())["weight_map"]}))


OUT_OF_FOLDER = "not a .safetensors file of this folder"
MISMATCH = "the index does not match the shards"
BAD = {
    "dotdot": (lambda d: _idx(d, lambda wm: _set(wm, UP, "../sharded/" + wm[UP])), OUT_OF_FOLDER),
    "absolute": (lambda d: _idx(d, lambda wm: _set(wm, UP, "/etc/x.safetensors")), OUT_OF_FOLDER),
    "symlink-out": (_link_out, "symlink to a file outside the checkpoint folder; copy the shard"),
    "missing-shard": (lambda d: _shard_of(d).unlink(), "has no such file; copy the missing shard"),
    "listed-absent": (lambda d: _idx(d, lambda wm: _set(wm, "model.ghost.weight", wm[UP])),
                      "does not hold it; " + MISMATCH),
    "unlisted": (lambda d: _idx(d, lambda wm: wm.pop(UP)), "not listed in model.safetensors.index.json; " + MISMATCH),
    "index-disagrees": (lambda d: _idx(d, lambda wm: _set(wm, UP, _other_shard(d))), "index.json says .*; " + MISMATCH),
    "in-two-shards": (_copy_into_other_shard, "stored in two weights files"),
    "bad-json": (lambda d: (d / INDEX_NAME).write_text('{"weight_map": '), "not valid JSON"),
    "no-weight-map": (lambda d: (d / INDEX_NAME).write_text('{"metadata": {}, "weight_map": []}'), "no weight_map"),
    "no-metadata": (_no_metadata, "no metadata object"),
    "too-large": (lambda d: (d / INDEX_NAME).write_bytes(b" " * (16 * 2**20 + 1)), "too large"),
    "shard-shape": (_wrong_shape, "has shape"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_inconsistent_sharded_folder_is_one_clear_error_on_both_paths(ckpts, tmp_path, case):
    edit, match = BAD[case]
    d = tmp_path / "sharded"
    shutil.copytree(ckpts[1], d)
    edit(d)
    for load in (matquant.load, _from_pretrained):
        with pytest.raises(CheckpointError, match=match) as e:
            load(d)
        assert "\n" not in str(e.value)
    assert main(["info", str(d)]) == 1


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_info_refuses_a_config_larger_than_its_tensors(ckpts, tmp_path, capsys, layout):
    """Was reported as a normal checkpoint: config.json claiming 100 000 layers of width 10 000 000."""
    d = tmp_path / layout
    shutil.copytree(ckpts[layout == "sharded"], d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(num_hidden_layers=100_000, hidden_size=10_000_000)
    (d / "config.json").write_text(json.dumps(cfg))
    assert main(["info", str(d)]) == 1
    err = capsys.readouterr().err
    assert "num_hidden_layers = 100000" in err or "hidden_size = 10000000" in err
    with pytest.raises(CheckpointError):
        matquant.load(d)


def test_info_checks_tensor_shapes_without_reading_values(ckpts, tmp_path):
    d = tmp_path / "sharded"
    shutil.copytree(ckpts[1], d)
    _wrong_shape(d)
    assert main(["info", str(d)]) == 1


needs_packed = pytest.mark.skipif(not cpu_packed.available(), reason="torch has no CPU int4 kernel")


@needs_packed
@pytest.mark.parametrize("bits,keep", [(4, None), (2, None), (4, [8])])
def test_streaming_keep_master_false_equals_packing_after_a_full_load(ckpts, bits, keep):
    from matquant.nn.bits import set_backend
    from matquant.nn.memory import drop_master, resident_bytes

    for d in ckpts:
        old, _, _ = load_checkpoint(d, bits=bits)  # the former path: everything in, then pack and drop
        set_backend(old, "auto", keep=keep)
        drop_master(old, keep or ())
        new, _ = matquant.load(d, bits=bits, keep_master=False, keep=keep)
        assert torch.equal(_logits(new), _logits(old))
        assert resident_bytes(new) == resident_bytes(old)
        layers = matquant.nn.matquant_modules(new).values()
        assert all(m.master_dropped for m in layers)


@needs_packed
def test_streaming_load_holds_one_layers_master_codes_at_a_time(ckpts, monkeypatch):
    import matquant.nn.memory as M

    seen = []
    orig = M.drop_layer_master

    def spy(layer, keep=()):
        model = spy.model
        held = [n for n, m in matquant.nn.matquant_modules(model).items()
                if not m.master_dropped and not m.qweight.is_meta]
        seen.append(len(held))
        return orig(layer, keep)

    from matquant.format import checkpoint as C

    orig_open = C.open_checkpoint

    def open_(*a, **k):
        model, q = orig_open(*a, **k)
        spy.model = model
        return model, q

    monkeypatch.setattr(M, "drop_layer_master", spy)
    monkeypatch.setattr(C, "open_checkpoint", open_)
    matquant.load(ckpts[1], bits=4, keep_master=False)
    assert len(seen) == 14 and max(seen) == 1  # the layer being packed, never two


def test_hf_cache_snapshot_links_into_its_blob_store_are_accepted(ckpts, tmp_path):
    """The HF cache links snapshots/<rev>/<file> to ../../blobs/<sha>: inside the cache entry, not an escape."""
    snap = tmp_path / "models--x" / "snapshots" / "abc"
    blobs = tmp_path / "models--x" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for p in ckpts[1].iterdir():
        (blobs / p.name).write_bytes(p.read_bytes())
        (snap / p.name).symlink_to(f"../../blobs/{p.name}")
    m, _, _ = load_checkpoint(snap)
    ref, _, _ = load_checkpoint(ckpts[1])
    assert torch.equal(_logits(m), _logits(ref))
