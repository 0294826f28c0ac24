"""Finding what to sketch in a Hugging Face causal LM, and loading models from directories, GGUF or the hub."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .errors import SketchError

BUNDLED_MODEL = Path(__file__).parent / "assets" / "tinystories-656k"
BUNDLED_TEXT = Path(__file__).parent / "assets" / "text"


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` of decoder blocks: as long as ``config.num_hidden_layers`` and holding linears.

    Works for Llama, Mistral, Qwen2, SmolLM2, Phi-3 and any model following the usual layout, without a
    per-architecture table.
    """
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n_layers is None or len(module) == n_layers):
            if any(isinstance(m, nn.Linear) for m in module[0].modules()):
                return name, module
    arch = type(model).__name__
    raise SketchError(f"unsupported architecture {arch}: no decoder layers with linear projections found")


def linear_modules(layer: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` inside one decoder layer, by its name relative to the layer."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, nn.Linear)}


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def is_sketched_dir(path: str | os.PathLike) -> bool:
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except json.JSONDecodeError as e:
        raise SketchError(f"corrupt checkpoint: {cfg} is not valid JSON ({e.msg})") from None
    return qc.get("quant_method") == "sketchtune"


def _looks_like_path(spec: str) -> bool:
    return spec.endswith(".gguf") or spec.startswith((".", "/", "~")) or os.sep + os.sep in spec or spec.count("/") > 1


def load_model(spec: str | os.PathLike, dtype: torch.dtype | str | None = "auto", device: str = "cpu"):
    """Load ``(model, tokenizer)`` from a local HF directory, a sketched directory, a ``.gguf`` file or a hub id.

    Sketched directories go through :func:`sketchtune.load`, which validates the checkpoint first.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = str(spec)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file() and path.suffix == ".gguf":
            kwargs = {"gguf_file": path.name}
            src = str(path.parent)
        elif path.is_dir():
            if is_sketched_dir(path):
                from .checkpoint import load

                return load(path, dtype=dtype, device=device)
            if not (path / "config.json").is_file():
                raise SketchError(f"{path} is not a model directory (no config.json)")
            kwargs, src = {}, str(path)
        else:
            raise SketchError(f"{path} is neither a model directory nor a .gguf file")
    elif _looks_like_path(spec):
        raise SketchError(f"no such file or directory: {spec}")
    else:
        kwargs, src = {}, spec
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, **kwargs)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SketchError(f"could not load model {spec!r}: {first}") from None
    if "gguf_file" in kwargs:
        _forget_gguf_quantization(model)
    model.to(device).eval()
    return model, tokenizer


def _forget_gguf_quantization(model) -> None:
    """transformers dequantizes GGUF tensors to plain floats on load but keeps its GGUF quantizer and config.

    Left in place, ``Trainer`` refuses the model as quantized and a saved copy claims GGUF quantization, which
    ``from_pretrained`` then will not combine with another quantization config (bitsandbytes, say).
    """
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
