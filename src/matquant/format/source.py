"""A model's weights read one tensor at a time, for the streaming pipeline (algorithms/streaming.py).

`open_source(spec)` resolves a model name, folder, .gguf file or hub id like `load_model` and returns a
`WeightSource`: its transformers config, its tokenizer, the state-dict names it provides and `get(name)`, each tensor
exactly as `load_model(spec)` puts it in the model (same dtype conversion), read without loading the rest. An HF
folder is read through safetensors' memory-mapped `safe_open` (one file or shards with an index); a GGUF through
format/gguf_source.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from matquant.models.loading import resolve_model


class WeightSource:
    """Interface: `config` (transformers PretrainedConfig), `names()`, `get(name, dtype)`, `tokenizer()`,
    `describe()`. Tensors tied to another (lm_head = embed_tokens) are absent when the source stores them once."""

    config = None

    def names(self) -> list[str]:
        raise NotImplementedError

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def tokenizer(self):
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def __contains__(self, name: str) -> bool:
        return name in set(self.names())


class SafetensorsSource(WeightSource):
    """An HF model folder with config.json and model.safetensors or shards + model.safetensors.index.json."""

    def __init__(self, folder):
        from transformers import AutoConfig

        from matquant.format.shards import INDEX_NAME, WEIGHTS_NAME, TensorReader

        self.folder = Path(folder)
        cfg = json.loads((self.folder / "config.json").read_text())
        if cfg.get("quantization_config", {}).get("quant_method") == "matquant":
            raise ValueError(f"{folder} is already a matquant checkpoint; load it with matquant.load() or "
                             "`matquant eval`, or pass the full-precision source model.")
        if not (self.folder / INDEX_NAME).exists() and not (self.folder / WEIGHTS_NAME).exists():
            raise FileNotFoundError(f"{folder} has neither {WEIGHTS_NAME} nor {INDEX_NAME}: the streaming pipeline "
                                    "reads safetensors weights only.")
        self.config = AutoConfig.from_pretrained(str(self.folder))
        self.reader = TensorReader(self.folder)

    def names(self) -> list[str]:
        return self.reader.names()

    def __contains__(self, name: str) -> bool:
        return name in self.reader

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        t = self.reader.get(name)
        return t.to(dtype) if t.is_floating_point() else t

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.folder))

    def describe(self) -> str:
        return str(self.folder)


def open_source(spec: str) -> WeightSource:
    """The WeightSource of a model name, folder, .gguf file (or a hub id already in the local HF cache)."""
    src = resolve_model(spec)
    if src.gguf_file:
        from matquant.format.gguf_source import GGUFSource

        return GGUFSource(Path(src.path) / src.gguf_file)
    folder = Path(src.path)
    if not folder.is_dir():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(src.path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    return SafetensorsSource(folder)
