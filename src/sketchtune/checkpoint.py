"""Saving and loading sketched checkpoints: ``save_pretrained`` layout, safetensors + JSON, never pickle.

A directory holds ``config.json`` (with ``quantization_config.quant_method = "sketchtune"``), the weights as
``model.safetensors`` (packed codes under ``<module>.weight`` as uint8, codebooks under
``<module>.codebook``) and the tokenizer files. :func:`load` checks the files before handing them to
``AutoModelForCausalLM.from_pretrained`` so that a truncated or edited checkpoint fails with one clear line.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from .errors import SketchError
from .hf_integration import check_embeddings_spec, register
from .layout import check_format_version, check_layout
from .naming import model_key

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


#: Files a sketched checkpoint consists of (``save_pretrained`` of model and tokenizer). Only a directory
#: holding nothing else may be replaced, so a user's own files are never deleted.
CHECKPOINT_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
)


def _is_checkpoint_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in CHECKPOINT_FILES)


def check_output_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse an output directory whose contents a save would destroy; call before any expensive work.

    A missing or empty directory is fine. An existing sketched checkpoint is replaced only with ``overwrite``,
    and only if it holds nothing but checkpoint files. Anything else (a model directory, a user's files) is
    refused: we never delete what we did not write.
    """
    out = Path(out_dir).expanduser()
    if not out.exists():
        return out
    if not out.is_dir():
        raise SketchError(f"output path {out} exists and is not a directory")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return out
    try:
        read_config(out)
        is_checkpoint = True
    except SketchError:
        is_checkpoint = False
    if not is_checkpoint:
        raise SketchError(f"output directory {out} is not empty and is not a sketchtune checkpoint; "
                          "refusing to write into it (choose another --out)")
    foreign = [e for e in entries if not _is_checkpoint_file(e)]
    if foreign:
        raise SketchError(f"output directory {out} holds files sketchtune did not write ({', '.join(foreign[:3])}); "
                          "refusing to replace it")
    if not overwrite:
        raise SketchError(f"output directory {out} already holds a sketched checkpoint; "
                          "pass --overwrite (overwrite=True) to replace it")
    return out


def save(model, tokenizer, out_dir: str | os.PathLike, dtype: torch.dtype | str | None = None,
         overwrite: bool = False) -> Path:
    """Write a sketched model (and tokenizer) to ``out_dir``; optionally cast float tensors to ``dtype`` first.

    Files are written to a temporary sibling directory that replaces ``out_dir`` only once complete, so an
    interrupted save never leaves a half-written checkpoint behind (nor destroys the previous one). An existing
    checkpoint is replaced only with ``overwrite=True``; see :func:`check_output_dir` for what is refused.
    """
    out = check_output_dir(out_dir, overwrite).resolve()
    if getattr(getattr(model, "config", None), "quantization_config", None) is None:
        raise SketchError("model has no sketchtune quantization_config; sketch it first")
    if isinstance(dtype, str):
        dtype = DTYPES[dtype]
    if dtype is not None:
        model.to(dtype)  # casts floating tensors only; packed codes stay uint8
        model.config.dtype = dtype

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return write_atomically(out, write)


def write_atomically(out: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a fresh sibling directory of ``out`` and only then let it replace ``out``.

    An interrupted write never leaves a half-written checkpoint behind, nor destroys the previous one (it is
    moved aside and put back if the new one never arrives). Call :func:`check_output_dir` first.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    old = None
    try:
        write(tmp)
        if out.exists():
            if any(out.iterdir()):
                old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
                out.rename(old / "checkpoint")  # checked by check_output_dir: holds only checkpoint files
            else:
                out.rmdir()
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            if not out.exists() and (old / "checkpoint").exists():
                (old / "checkpoint").rename(out)  # the new one never arrived: put the previous one back
            shutil.rmtree(old, ignore_errors=True)
    return out


def read_config(path: str | os.PathLike) -> dict:
    """config.json of a sketched checkpoint, with a one-line error for anything that is not one."""
    path = Path(path).expanduser()
    if not path.exists():
        raise SketchError(f"no such checkpoint directory: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        if (path / "sketch_adapter.safetensors").is_file() or (path / "checkpoints").is_dir():
            raise SketchError(f"{path} is a training run directory (a sketch adapter), not a sketched checkpoint: "
                              "pass its base checkpoint, with --adapter for the run")
        raise SketchError(f"corrupt checkpoint: {path} has no config.json")
    try:
        cfg = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise SketchError(f"corrupt checkpoint: config.json is not valid JSON ({e.msg})") from None
    qc = cfg.get("quantization_config") or {}
    if qc.get("quant_method") != "sketchtune":
        raise SketchError(f"{path} is not a sketchtune checkpoint (no sketchtune quantization_config)")
    check_format_version(qc.get("format_version"))  # a newer format: not corrupt, just not ours to read
    try:
        check_layout(qc.get("bits"), qc.get("gpr"))
    except SketchError as e:
        raise SketchError(f"corrupt checkpoint: quantization_config: {e}") from None
    return cfg


def weight_files(path: Path, what: str = "corrupt checkpoint") -> list[Path]:
    """The safetensors files of a ``save_pretrained`` directory: the index's shards, else ``model.safetensors``."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError):
            raise SketchError(f"{what}: model.safetensors.index.json is unreadable") from None
        return [path / s for s in shards]
    return [path / "model.safetensors"]


def model_type_of(path: str | os.PathLike) -> str | None:
    """config.json's ``model_type`` (what :mod:`.naming` needs), or None where there is none to read."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def checkpoint_tensors(path: str | os.PathLike) -> dict[str, tuple[str, list[int]]]:
    """Every tensor's (dtype, shape) across the checkpoint's safetensors files, reading headers only; keyed by
    in-memory names (:func:`.naming.model_key`), as ``quantization_config`` names modules."""
    path = Path(path)
    model_type = model_type_of(path)
    found: dict[str, tuple[str, list[int]]] = {}
    for f in weight_files(path):
        if not f.is_file():
            raise SketchError(f"corrupt checkpoint: missing weight file {f.name}")
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    sl = st.get_slice(key)
                    found[model_key(key, model_type)] = (sl.get_dtype(), list(sl.get_shape()))
        except Exception as e:  # safetensors raises its own error types for truncation / bad headers
            raise SketchError(f"corrupt checkpoint: cannot read {f.name} ({str(e).splitlines()[0]})") from None
    return found


def validate(path: str | os.PathLike) -> dict:
    """Check config, weight files and that every sketched module has its codes and codebook."""
    cfg = read_config(path)
    qc = cfg["quantization_config"]
    tensors = checkpoint_tensors(path)
    spec = qc.get("embeddings")
    if spec is not None:
        spec = check_embeddings_spec(spec, qc["bits"], qc["gpr"])
    tables = [spec["input"]] + ([] if spec["tied"] else [spec["output"]]) if spec else []
    for name in [*qc.get("modules", []), *tables]:
        for suffix, want in (("weight", "U8"), ("codebook", None)):
            key = f"{name}.{suffix}"
            if key not in tensors:
                raise SketchError(f"corrupt checkpoint: tensor {key} is missing")
            if want and tensors[key][0] != want:
                raise SketchError(f"corrupt checkpoint: {key} has dtype {tensors[key][0]}, expected packed {want}")
    return cfg


def run_dtype(path: str | os.PathLike, dtype: torch.dtype | str | None, device: str):
    """The dtype to load a model directory in: ``dtype`` as asked, except that ``"auto"`` on CPU runs a float16
    checkpoint (what ``sketchtune sketch`` writes by default) in float32. CPUs have no fast fp16 GEMM and the
    native kernels take fp32/bf16 activations only: loaded in fp16, a SmolLM2 codebook training step took
    ~110 s instead of a few, and decoding fell back to unpacking every layer on every call."""
    if dtype != "auto" or str(device) != "cpu":
        return dtype
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return dtype
    return torch.float32 if (cfg.get("dtype") or cfg.get("torch_dtype")) == "float16" else dtype


def load(path: str | os.PathLike, dtype: torch.dtype | str | None = "auto", device: str = "cpu"):
    """Load ``(model, tokenizer)`` from a sketched directory, with sketched layers rebuilt exactly.

    Equivalent to ``AutoModelForCausalLM.from_pretrained(path)`` after ``import sketchtune``, plus checks —
    and, as the CLI does, ``dtype="auto"`` on CPU runs a float16 checkpoint in float32 (see
    :func:`run_dtype`: CPUs have no fast fp16 GEMM; pass ``torch.float16`` to keep it).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    register()
    path = Path(path).expanduser()
    validate(path)
    dtype = run_dtype(path, dtype, device)
    if isinstance(dtype, str) and dtype in DTYPES:
        dtype = DTYPES[dtype]
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    except SketchError:
        raise
    except (OSError, RuntimeError, ValueError) as e:
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise SketchError(f"corrupt checkpoint: {first.strip()}") from None
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise SketchError(f"corrupt checkpoint: {name} contains NaN or Inf")
    tokenizer = AutoTokenizer.from_pretrained(str(path)) if (path / "tokenizer_config.json").is_file() else None
    model.to(device).eval()
    return model, tokenizer
