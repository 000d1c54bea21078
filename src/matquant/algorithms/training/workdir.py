"""The work dir of a training run (`--work-dir`), shared by QAT and OmniQuant: rerunning the same command resumes.

Layout: `settings.json` (the run's settings and their fingerprint) and one `<unit>.safetensors` file per finished
unit of work (an OmniQuant block, a QAT step checkpoint), each holding its tensors and a JSON metadata entry.
Every file is written atomically (temporary sibling + rename), so a unit file that exists is complete: a kill at
any moment leaves either the previous state or the new one, never half of one. A folder whose settings differ
from the current run's is refused with the settings that differ.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save

from matquant.format.atomic import atomic_write_bytes, atomic_write_json

SETTINGS_FILE = "settings.json"
LAYOUT_VERSION = 2  # 1: the earlier per-method layouts (state.json / latest.json); not resumable


def tensor_sha256(*tensors: torch.Tensor) -> str:
    """Fingerprint of tensors' exact values (dtype, shape and bytes)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _canonical(settings: dict) -> dict:
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(_canonical(settings), sort_keys=True).encode()).hexdigest()[:16]


class WorkDir:
    """Units of finished work for one run's settings (see the module docstring)."""

    def __init__(self, path, settings: dict):
        self.path = Path(path)
        self.settings = _canonical(settings)
        self.fingerprint = fingerprint(settings)
        f = self.path / SETTINGS_FILE
        if f.exists():
            try:
                saved = json.loads(f.read_text())
                saved_fp, saved_settings = saved["fingerprint"], saved.get("settings") or {}
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{f} is corrupt ({type(e).__name__}: {e}); delete {self.path} to start over.") \
                    from None
            if saved_fp != self.fingerprint:
                raise ValueError(f"work dir {self.path} holds a run with different settings ({_diff(saved_settings, self.settings)}); "
                                 "rerun the identical command to resume, or use another --work-dir (or delete that "
                                 "folder) to start over.")
            return
        if self.path.exists() and any(not q.name.startswith(".") for q in self.path.iterdir()):
            raise ValueError(f"{self.path} is not empty and has no {SETTINGS_FILE}: it is not a matquant work dir of "
                             "this version; use another --work-dir or delete it.")
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_json(f, {"layout": LAYOUT_VERSION, "fingerprint": self.fingerprint, "settings": self.settings})

    def _file(self, name: str) -> Path:
        return self.path / f"{name}.safetensors"

    def has(self, name: str) -> bool:
        return self._file(name).exists()

    def names(self, prefix: str = "") -> list[str]:
        """Finished units whose name starts with `prefix`, sorted (temporary files are not units)."""
        return sorted(p.name[: -len(".safetensors")] for p in self.path.glob(f"{prefix}*.safetensors")
                      if not p.name.startswith("."))

    def save(self, name: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        atomic_write_bytes(self._file(name), st_save(tensors, metadata={"matquant": json.dumps(meta)}))

    def load(self, name: str) -> tuple[dict[str, torch.Tensor], dict]:
        f = self._file(name)
        try:
            with safe_open(str(f), framework="pt") as h:
                meta = json.loads((h.metadata() or {})["matquant"])
                tensors = {k: h.get_tensor(k) for k in h.keys()}
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as e:
            raise ValueError(f"{f} is unreadable ({type(e).__name__}: {e}); delete {self.path} to start over.") \
                from None
        return tensors, meta

    def remove(self, name: str) -> None:
        self._file(name).unlink(missing_ok=True)

    def clean_temporaries(self) -> None:
        """Remove temporary files a killed process left behind (never a finished unit)."""
        for p in self.path.glob(".*"):
            if p.is_file() and p.name != SETTINGS_FILE:
                p.unlink(missing_ok=True)


def _diff(saved: dict, now: dict, limit: int = 4) -> str:
    def flat(d, pre=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{pre}{k}."))
            else:
                out[pre + k] = v
        return out

    a, b = flat(saved), flat(now)
    diff = [f"{k}: {_short(a.get(k))} there, {_short(b.get(k))} now" for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k)]
    if len(diff) > limit:
        diff = diff[:limit] + [f"... {len(diff) - limit} more"]
    return "; ".join(diff) or "fingerprint"


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."
