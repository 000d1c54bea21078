"""The results store: one JSON object per line (JSONL), append-only.

Format (one line = one finished measurement; documented in docs/experiments.md)::

    {"key": "<16 hex>", "config": {...every setting that defines the measurement...},
     "result": {...numbers...}, "code_version": "<git describe or matquant version>",
     "started": "<UTC ISO time>", "seconds": <wall time>, "host": {"torch": ..., "threads": ..., "device": ...}}

`key` is a hash of the canonical JSON of `config`; a config whose key is in the store is done and is skipped.
Appends are atomic in practice: each record is ONE os.write() of one line on an O_APPEND descriptor, followed by
fsync; a crash can at worst leave a torn LAST line, which readers skip with a warning (and the next append starts
on a fresh line). Completed records are never rewritten or deleted.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import subprocess
import warnings
from functools import lru_cache
from pathlib import Path


def config_key(config: dict) -> str:
    canon = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()[:16]


@lru_cache(maxsize=1)
def code_version() -> str:
    """`git describe --always --dirty` of the matquant source tree, else the package version."""
    from matquant import __version__

    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return f"{__version__}+g{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    return __version__


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class ResultStore:
    """Append-only JSONL store of finished measurements, keyed by the hash of their config."""

    def __init__(self, path):
        self.path = Path(path)
        if self.path.exists() and self.path.is_dir():
            raise ValueError(f"results store {self.path} is a folder; pass a .jsonl file path.")

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        out = []
        for i, line in enumerate(self.path.read_text(encoding="utf-8").split("\n"), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict) or "key" not in rec or "config" not in rec:
                    raise ValueError("not a result record")
            except ValueError as e:
                warnings.warn(f"{self.path}:{i}: skipping unreadable line ({e}); it was probably torn by a crash "
                              "and will be measured again.", stacklevel=2)
                continue
            out.append(rec)
        return out

    def keys(self) -> set[str]:
        return {r["key"] for r in self.records()}

    def done(self, config: dict) -> bool:
        return config_key(config) in self.keys()

    def append(self, config: dict, result: dict, seconds: float | None = None, started: str | None = None,
               host: dict | None = None) -> dict:
        rec = {"key": config_key(config), "config": config, "result": result, "code_version": code_version(),
               "started": started or utc_now(), "seconds": seconds if seconds is not None else result.get("seconds"),
               "host": host or host_info()}
        line = json.dumps(rec, sort_keys=False, default=_jsonable, allow_nan=True)
        assert "\n" not in line
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            prefix = ""
            size = os.fstat(fd).st_size
            if size:  # a torn last line (crash mid-write) must not swallow this record
                with open(self.path, "rb") as f:
                    f.seek(size - 1)
                    prefix = "" if f.read(1) == b"\n" else "\n"
            os.write(fd, (prefix + line + "\n").encode("utf-8"))
            os.fsync(fd)
        finally:
            os.close(fd)
        return rec


def host_info() -> dict:
    import torch

    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "device": "cuda:" + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    if hasattr(x, "tolist"):
        return x.tolist()
    return str(x)
