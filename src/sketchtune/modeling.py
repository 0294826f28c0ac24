"""Loading models: local HF directories, sketched directories, GGUF files, hub ids, peft adapters, sketch adapters.

The top floor of the package's plumbing: it may use everything below it (checkpoints, adapters); the
pipelines and the CLI use it. ``find_decoder_layers`` and friends live in :mod:`sketchtune.architecture`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .architecture import find_decoder_layers, linear_modules  # noqa: F401  (re-exported for users)
from .bundled import BUNDLED_MODEL, BUNDLED_TEXT  # noqa: F401  (re-exported for users)
from .checkpoint import load, run_dtype
from .errors import SketchError
from .train.adapter import load_adapter


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
                return load(path, dtype=dtype, device=device)  # which applies run_dtype itself
            dtype = run_dtype(path, dtype, device)
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


def resolve_device(name: str | None) -> str:
    """The compute device: ``name`` if given (and available), else CUDA when present, else CPU."""
    if name:
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise SketchError(f"device {name} requested but CUDA is not available")
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_for_eval(spec: str, adapter: str | None = None, device: str = "cpu"):
    """``(model, tokenizer)`` from a model spec, a peft adapter directory, or a sketched model plus a sketch adapter."""
    path = Path(spec).expanduser()
    if (path / "adapter_config.json").is_file():
        if adapter:
            raise SketchError(f"{spec} is a peft adapter directory; --adapter cannot be applied on top of it")
        return _load_peft(path, device)
    model, tokenizer = load_model(spec, device=device)
    if adapter:
        load_adapter(model, adapter)
    return model, tokenizer


def _load_peft(path: Path, device: str):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoTokenizer

    try:
        base = json.loads((path / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except json.JSONDecodeError as e:
        raise SketchError(f"{path / 'adapter_config.json'} is not valid JSON ({e.msg})") from None
    has_tokenizer = any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))
    if not has_tokenizer and not base:
        raise SketchError(f"{path} has no tokenizer and its adapter_config.json names no base model")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if has_tokenizer else base)
        model = AutoPeftModelForCausalLM.from_pretrained(str(path), dtype="auto")
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SketchError(f"could not load peft adapter {path}: {first}") from None
    model.to(device).eval()
    return model, tokenizer
