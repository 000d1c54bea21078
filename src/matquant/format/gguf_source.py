"""A GGUF file's weights read one tensor at a time, each exactly as `load_model` puts it in the model.

`GGUFSource(path)` is the GGUF `WeightSource` of format/source.py. The tensor data stays in gguf-py's memory-mapped
`GGUFReader`; `get(name)` dequantizes only the GGUF tensor(s) behind one state-dict name (`gguf.dequantize`) and
runs them through the same steps as transformers' GGUF loader (`load_gguf_checkpoint` in
transformers/modeling_gguf_pytorch_utils.py): its GGUF -> HF name map (`get_gguf_hf_weights_map`, built on a
meta-device model), its per-architecture tensor processor (Llama's Q/K reverse permutation, Gemma's `norm - 1`, the
MoE gate/up merge, ...), `torch.from_numpy` and the cast to the model dtype. Nothing of these tables is copied here,
so the result is bit-identical to `load_model(spec, dtype)[0].state_dict()[name]`.

After a tensor is read its pages of the mapping are handed back to the kernel (`madvise(MADV_DONTNEED)`), so reading
every tensor in turn keeps about one tensor resident, not the file.
"""
from __future__ import annotations

import mmap
import re
from pathlib import Path

import numpy as np
import torch


GGUF_MAGIC = b"GGUF"


def _check_gguf_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"no such GGUF file: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (it does not start with b'GGUF'); pass a .gguf model file.")


DEQUANT_CHUNK_BYTES = 32 << 20  # float32 output per gguf.dequantize call: bounds its temporaries


def dequantize_rows(data: np.ndarray, tensor_type, chunk_bytes: int = DEQUANT_CHUNK_BYTES) -> np.ndarray:
    """`gguf.dequantize(data, tensor_type)` a block of rows at a time into one float32 array of its own.

    GGML blocks never span rows and dequantization is elementwise per block, so the values are exactly those of
    one whole-tensor call; the peak is the output plus one chunk's temporaries instead of several full-size
    temporaries. The result never points into the file mapping."""
    from gguf import dequantize

    rows = data.reshape(-1, data.shape[-1]) if data.ndim > 1 else data.reshape(1, -1)
    first = dequantize(rows[:1], tensor_type)
    out = np.empty((rows.shape[0], first.shape[-1]), dtype=first.dtype)
    step = max(1, chunk_bytes // max(1, first.nbytes))
    for start in range(0, rows.shape[0], step):
        out[start:start + step] = dequantize(rows[start:start + step], tensor_type)
    return out.reshape(*data.shape[:-1], first.shape[-1])


def _loads_packed(architecture: str) -> bool:
    """Whether transformers loads this architecture through its packed-block GGUF quantizer (newer versions)."""
    try:
        from transformers.integrations.gguf.utils import is_gguf_arch_supported
    except ImportError:
        return False
    return is_gguf_arch_supported(architecture)


def _config_from_gguf_dict(parsed_config: dict):
    """The transformers config `load_model` ends with: built from the GGUF's config dict like AutoConfig does, in
    float32 (load_model's default dtype), without a quantization_config (load_model deletes it)."""
    from transformers import CONFIG_MAPPING

    config_dict = dict(parsed_config)
    if config_dict["model_type"] == "mistral" and "layer_types" in config_dict:  # AutoConfig's own heuristic
        config_dict["model_type"] = "ministral"
    config = CONFIG_MAPPING[config_dict["model_type"]].from_dict(config_dict)
    config.dtype = torch.float32
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    return config


class GGUFSource:  # the WeightSource interface of format/source.py (duck-typed: source.py imports this module)
    """A .gguf model file read through gguf-py's memory-mapped reader, one dequantized tensor per `get`."""

    def __init__(self, path):
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            load_gguf_checkpoint,
            read_field,
        )

        self.path = Path(path)
        _check_gguf_file(self.path)
        reader = GGUFReader(str(self.path))
        self.architecture = read_field(reader, "general.architecture")[0]
        if _loads_packed(self.architecture):
            # transformers loads these through its packed-block quantizer (its own dequantization kernels and
            # conversion ops), not through load_gguf_checkpoint; reading them the legacy way would not match
            raise NotImplementedError(
                f"{self.path.name} is a {self.architecture!r} GGUF, which transformers loads through its packed GGUF "
                "path; the streaming GGUF source reads only the architectures of transformers' legacy GGUF loader. "
                "Convert the model to an HF safetensors folder, or quantize it with the in-memory pipeline.")
        # the GGUF metadata parsed by transformers' own loader: the config dict from_pretrained builds the config
        # from (AutoConfig.from_pretrained(folder, gguf_file=...) -> CONFIG_MAPPING[model_type].from_dict), and
        # the dict load_gguf_checkpoint hands its tensor processor
        parsed_config = load_gguf_checkpoint(str(self.path), return_tensors=False)["config"]
        self.config = _config_from_gguf_dict(parsed_config)
        self.config.name_or_path = str(self.path.parent)  # as from_pretrained(folder, gguf_file=...) sets it
        self.processor = TENSOR_PROCESSORS.get(self.architecture, TensorProcessor)(config=parsed_config)
        self.key_map = self._gguf_to_hf_map()
        # only the tensor table and the mapping are kept: the reader's metadata fields (one small array per
        # vocabulary entry) would stay resident for nothing
        self.gguf_tensors = {t.name: t for t in reader.tensors}  # GGUF name -> gguf ReaderTensor (mapped data)
        self._mapping = reader.data
        self._sources: dict[str, list[str]] = {}  # HF name -> the GGUF tensors it is made of, in file order
        for t in reader.tensors:
            hf_name = self._hf_name(t.name)
            if hf_name is not None:
                self._sources.setdefault(hf_name, []).append(t.name)

    def _gguf_to_hf_map(self) -> dict[str, str]:
        """transformers' GGUF -> HF name map, computed on a meta-device model of this config (no weights)."""
        from transformers import AutoModelForCausalLM
        from transformers.modeling_gguf_pytorch_utils import get_gguf_hf_weights_map

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(self.config)
        return get_gguf_hf_weights_map(skeleton, self.processor)

    def _hf_name(self, gguf_name: str) -> str | None:
        """The state-dict name a GGUF tensor ends up in, or None where transformers drops it."""
        if gguf_name in self.key_map:
            return self.key_map[gguf_name]
        # processors that route a tensor themselves: merged MoE experts (keyed without `.weight`)
        pattern = getattr(self.processor, "GGUF_MOE_WEIGHTS_PATTERN", None)
        if pattern is not None and (m := re.fullmatch(pattern, gguf_name)) and "name" in m.groupdict():
            return self.key_map.get(m["name"])
        if self.architecture == "gpt2" and gguf_name == "output.weight":  # GPT2TensorProcessor stores it itself
            return "lm_head.weight"
        return None

    def names(self) -> list[str]:
        return list(self._sources)

    def __contains__(self, name: str) -> bool:
        return name in self._sources

    def get(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if name not in self._sources:
            raise KeyError(f"{self.path.name} has no tensor {name!r} (tied or not in the file); "
                           f"names() lists the {len(self._sources)} it has.")
        parsed = {"tensors": {}}  # where processors that build a tensor from several GGUF tensors put it
        weights = None
        for gguf_name in self._sources[name]:
            t = self.gguf_tensors[gguf_name]
            result = self.processor.process(weights=dequantize_rows(t.data, t.tensor_type), name=gguf_name,
                                            tensor_key_mapping=self.key_map, parsed_parameters=parsed)
            if result.name is not None:
                weights = result.weights
            self._release(t)
        if name in parsed["tensors"]:
            tensor = parsed["tensors"][name]
        else:
            tensor = torch.from_numpy(self._owned(weights))
        return tensor.to(dtype) if tensor.is_floating_point() else tensor

    def _owned(self, weights: np.ndarray) -> np.ndarray:
        """`weights` as a writable array of its own (a copy only where it still points into the mapping)."""
        if weights.flags.writeable and weights.flags.c_contiguous and not np.may_share_memory(weights,
                                                                                               self._mapping):
            return weights
        return np.copy(weights)

    def _release(self, t) -> None:
        """Drop the tensor's pages from this process's mapping (they stay in the page cache)."""
        mm = getattr(self._mapping, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise") or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = t.data_offset // mmap.PAGESIZE * mmap.PAGESIZE
        end = min(-(-(t.data_offset + t.n_bytes) // mmap.PAGESIZE) * mmap.PAGESIZE, len(mm))
        if end > start:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)

    def describe(self) -> str:
        return f"{self.path} (GGUF, {self.architecture}, {len(self._sources)} tensors)"
