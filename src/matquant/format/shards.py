"""Sharded safetensors, the Hugging Face layout: `model-0000k-of-0000N.safetensors` + `model.safetensors.index.json`
({"metadata": {"total_size": bytes}, "weight_map": {tensor name: shard file}}); one shard is a plain
`model.safetensors` with no index.

`ShardWriter` writes tensors one at a time in constant memory: each tensor's bytes go straight to a data file, and
the shard is assembled (header + data) when it is full, so a 7B checkpoint is written without ever holding more than
one tensor. `TensorReader` reads either layout a tensor at a time (memory-mapped by safetensors).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 2**30

_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.uint8: "U8", torch.int8: "I8",
           torch.int16: "I16", torch.int32: "I32", torch.int64: "I64", torch.bool: "BOOL", torch.float64: "F64"}


def shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


class ShardWriter:
    """Write tensors to `folder` as shards of at most `max_shard_bytes` (a tensor larger than that gets a shard of
    its own); `close()` names the shards, writes the index (none for a single shard) and returns the weight map."""

    def __init__(self, folder, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, metadata: dict | None = None):
        if max_shard_bytes < 1:
            raise ValueError(f"the maximum shard size must be positive, got {max_shard_bytes} bytes.")
        self.folder = Path(folder)
        self.max = int(max_shard_bytes)
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards: list[tuple[Path, dict]] = []  # (assembled temporary file, header)
        self.names: set[str] = set()
        self.total = 0
        self._data = None
        self._header: dict = {}
        self._offset = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names:
            raise ValueError(f"tensor {name!r} written twice.")
        if tensor.dtype not in _DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}, which this writer does not store.")
        t = tensor.detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if self._data is not None and self._offset and self._offset + nbytes > self.max:
            self._finish_shard()
        if self._data is None:
            self._data = open(self.folder / f".shard-{len(self.shards):05d}.data", "wb")
            self._header, self._offset = {}, 0
        if nbytes:
            # flattened first: a [rows, 1] tensor counts as contiguous with any stride on its last dimension
            self._data.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        self._header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                              "data_offsets": [self._offset, self._offset + nbytes]}
        self._offset += nbytes
        self.total += nbytes
        self.names.add(name)

    def _finish_shard(self) -> None:
        self._data.close()
        data = Path(self._data.name)
        header = {"__metadata__": self.metadata, **dict(sorted(self._header.items()))}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        out = data.with_suffix(".safetensors")
        with open(out, "wb") as f, open(data, "rb") as src:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            shutil.copyfileobj(src, f, 16 * 2**20)
        data.unlink()
        self.shards.append((out, self._header))
        self._data = None

    def close(self) -> dict[str, str]:
        """Name the shards and write the index; returns {tensor name: file name}."""
        if self._data is not None:
            self._finish_shard()
        n = len(self.shards)
        weight_map = {}
        for k, (path, header) in enumerate(self.shards, 1):
            name = WEIGHTS_NAME if n == 1 else shard_name(k, n)
            os.replace(path, self.folder / name)
            weight_map.update({t: name for t in header})
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map

    def abort(self) -> None:
        if self._data is not None:
            self._data.close()
            Path(self._data.name).unlink(missing_ok=True)
            self._data = None
        for path, _ in self.shards:
            path.unlink(missing_ok=True)


class TensorReader:
    """The tensors of a folder in either layout (or of one .safetensors file), read one at a time:
    `names()`, `shape(name)`, `dtype(name)`, `get(name)`; `files()` lists the weight files."""

    def __init__(self, path):
        from safetensors import safe_open

        path = Path(path)
        if path.is_file():
            self.weight_map = None
            files = [path]
        elif (path / INDEX_NAME).exists():
            index = json.loads((path / INDEX_NAME).read_text())
            self.weight_map = dict(index["weight_map"])
            files = [path / f for f in sorted(set(self.weight_map.values()))]
        else:
            self.weight_map = None
            files = [path / WEIGHTS_NAME]
        self._handles = {f.name: safe_open(str(f), framework="pt") for f in files}
        self._paths = {f.name: f for f in files}
        self._layout: dict[str, tuple[int, dict]] = {}
        self._where = {}
        for fname, h in self._handles.items():
            for k in h.keys():
                self._where[k] = fname

    def files(self) -> list[str]:
        return list(self._handles)

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _slice(self, name):
        return self._handles[self._where[name]].get_slice(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def dtype(self, name: str) -> str:
        """The stored dtype's safetensors name ('BF16', 'F32', 'U8', ...)."""
        return self._slice(name).get_dtype()

    def get(self, name: str) -> torch.Tensor:
        """The tensor, read with plain file reads (not memory-mapped: pages of a mapped multi-GB file would stay in
        the process's resident memory as it is read, growing with the model's size)."""
        fname = self._where[name]
        if fname not in self._layout:
            self._layout[fname] = _data_layout(self._paths[fname])
        base, header = self._layout[fname]
        info = header[name]
        start, end = info["data_offsets"]
        buf = bytearray(end - start)
        with open(self._paths[fname], "rb") as f:
            f.seek(base + start)
            if f.readinto(buf) != len(buf):
                raise ValueError(f"{self._paths[fname]} ends inside tensor {name!r}: the file is truncated.")
        dtype = _FROM_NAME[info["dtype"]]
        if not buf:
            return torch.empty(info["shape"], dtype=dtype)
        return torch.frombuffer(buf, dtype=dtype).reshape(info["shape"])


_FROM_NAME = {v: k for k, v in _DTYPES.items()}


def _data_layout(path: Path) -> tuple[int, dict]:
    """(offset of the data section, the header's tensor entries) of a safetensors file (already opened once by
    safetensors, which validated the header)."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header
