"""Resumable sketching: every finished decoder layer is written to disk, so a killed run loses at most one.

A run with a ``progress_dir`` writes, after each layer, ``layer-NNNNN.safetensors`` (that layer's whole state:
packed codes, fp32 codebooks, biases and what stayed dense — exactly what the in-memory layer holds) and then ``progress.json`` (the run's
settings, the finished layers, their errors and what stayed dense), each atomically. Resuming checks the
settings match, installs the finished layers, re-captures the calibration inputs (deterministic) and runs
them through the finished layers instead of re-sketching them, so the result is identical to an uninterrupted
run. Safetensors + JSON only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from .._io import save_safetensors_atomic, write_json_atomic
from ..architecture import projection_shape
from ..errors import SketchError
from ..sketched_linear import SketchedLinear

PROGRESS = "progress.json"


class SketchProgress:
    """The finished layers of one sketching run in ``root`` (created on first write)."""

    def __init__(self, root: str | os.PathLike, settings: dict[str, Any]):
        self.root = Path(root)
        self.settings = settings
        self.done: dict[int, dict] = {}  # layer index -> {"errors": {...}, "left_dense": {...}, "modules": [...]}

    @classmethod
    def resume(cls, root: str | os.PathLike, settings: dict[str, Any]) -> "SketchProgress":
        """The progress in ``root``; refuses one made with other settings (its layers would not fit)."""
        root = Path(root)
        path = root / PROGRESS
        if not path.is_file():
            raise SketchError(f"--resume: no partial sketch to resume at {root}")
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SketchError(f"--resume: {path} is not valid JSON ({e.msg})") from None
        differ = {k: (saved["settings"].get(k), v) for k, v in settings.items() if saved["settings"].get(k) != v}
        if differ:
            what = ", ".join(f"{k} {old!r} vs {new!r}" for k, (old, new) in differ.items())
            raise SketchError(f"--resume: the partial sketch at {root} was made with other settings ({what})")
        progress = cls(root, settings)
        progress.done = {int(k): v for k, v in saved["done"].items()}
        for i in progress.done:
            if not layer_path(root, i).is_file():
                raise SketchError(f"--resume: {layer_path(root, i)} is missing; start over with --overwrite")
        return progress

    def save_layer(self, index: int, layer: torch.nn.Module, errors: dict[str, float], left: dict[str, str],
                   experts: list[str] | None = None) -> None:
        mods = {n: m for n, m in layer.named_modules() if isinstance(m, SketchedLinear)}
        tensors = layer_tensors(layer)
        save_safetensors_atomic(tensors, layer_path(self.root, index))
        self.done[index] = {"modules": list(mods), "errors": errors, "left_dense": left, "experts": experts or []}
        payload = {"settings": self.settings, "done": {str(k): v for k, v in sorted(self.done.items())}}
        write_json_atomic(self.root / PROGRESS, payload, indent=1)

    def load_layer(self, index: int, layer: torch.nn.Module, bits: int) -> dict[str, SketchedLinear]:
        """The finished layer's ``SketchedLinear`` modules (by name relative to the layer), exactly as saved."""
        tensors = load_file(str(layer_path(self.root, index)))
        built = {}
        for name in self.done[index]["modules"]:
            original = layer.get_submodule(name)
            codebook = tensors[f"{name}.codebook"]
            out, gpr, _ = codebook.shape
            new = SketchedLinear(projection_shape(original)[0], out, bits, gpr, bias=f"{name}.bias" in tensors,
                                 dtype=codebook.dtype,
                                 device=codebook.device)
            with torch.no_grad():
                new.weight.copy_(tensors[f"{name}.weight"])
                new.codebook.copy_(codebook)
                if new.bias is not None:
                    new.bias.copy_(tensors[f"{name}.bias"])
            built[name] = new
        return built


def layer_tensors(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The layer's whole saved state (sketched codes and codebooks, and whatever stayed dense: norms, routers) on
    the CPU; a tensor shared under two names is kept under the first, as ``save_pretrained`` does."""
    tensors, seen = {}, set()
    for name, t in layer.state_dict().items():
        if t.data_ptr() in seen and t.numel():
            continue
        seen.add(t.data_ptr())
        tensors[name] = t.detach().cpu().contiguous()
    return tensors


def layer_path(root: str | os.PathLike, index: int) -> Path:
    """Where a run with progress directory ``root`` keeps finished layer ``index``."""
    return Path(root) / f"layer-{index:05d}.safetensors"
