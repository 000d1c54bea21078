"""format/atomic.py: replacing a result is atomic, leftovers of killed runs are removed, files get normal modes."""
from __future__ import annotations

import os
import subprocess
import sys
import threading

import pytest

from matquant.format import atomic
from matquant.format.atomic import atomic_dir, remove_stale_temporaries


def _write(out, text, overwrite=True):
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "a.txt").write_text(text)
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(text.encode())


def test_overwrite_never_leaves_the_output_missing(tmp_path):
    out = tmp_path / "ckpt"
    _write(out, "v0", overwrite=False)
    missing = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if not (out / "a.txt").exists():
                missing.append(1)

    t = threading.Thread(target=watch)
    t.start()
    try:
        for i in range(1, 60):
            _write(out, f"v{i}")
    finally:
        stop.set()
        t.join()
    assert (out / "a.txt").read_text() == "v59"
    assert (out / "sub" / "b.bin").read_bytes() == b"v59"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no tmp/old siblings left
    if sys.platform == "linux":
        assert not missing, f"the output folder was missing {len(missing)} times during overwrites"


@pytest.mark.skipif(sys.platform != "linux", reason="renameat2 is Linux-only")
def test_rename_exchange_swaps_two_folders(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("A")
    (b / "f").write_text("B")
    assert atomic._rename_exchange(a, b)
    assert (a / "f").read_text() == "B" and (b / "f").read_text() == "A"


def test_exists_without_overwrite_is_refused_and_kept(tmp_path):
    out = tmp_path / "ckpt"
    _write(out, "v0", overwrite=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        _write(out, "v1", overwrite=False)
    assert (out / "a.txt").read_text() == "v0"


def test_failure_inside_keeps_the_old_result_and_cleans_up(tmp_path):
    out = tmp_path / "ckpt"
    _write(out, "v0", overwrite=False)
    with pytest.raises(RuntimeError):
        with atomic_dir(out, overwrite=True) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("killed")
    assert (out / "a.txt").read_text() == "v0"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_leftovers_of_a_dead_process_are_removed(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    dead = proc.pid
    out = tmp_path / "ckpt"
    stale = tmp_path / f".ckpt.tmp-{dead}-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 10)
    stale_old = tmp_path / f".ckpt.old-{dead}-def"
    stale_old.mkdir()
    alive = tmp_path / f".ckpt.tmp-{os.getppid()}-ghi"  # a running process's temporary folder is left alone
    alive.mkdir()
    other = tmp_path / f".other.tmp-{dead}-jkl"  # another output's leftovers are not ours to remove
    other.mkdir()
    _write(out, "v0", overwrite=False)
    assert not stale.exists() and not stale_old.exists()
    assert alive.exists() and other.exists()
    assert remove_stale_temporaries(out) == []


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_written_files_get_the_umask_mode(tmp_path):
    out = tmp_path / "ckpt"
    with atomic_dir(out) as tmp:
        f = tmp / "strict.bin"
        f.write_bytes(b"x")
        os.chmod(f, 0o600)  # as safetensors' writer creates its files
    mask = os.umask(0)
    os.umask(mask)
    assert (out / "strict.bin").stat().st_mode & 0o777 == 0o666 & ~mask
