"""Sketch adapters: the trained codebooks alone, loadable onto the sketched base they were trained from.

A fine-tuned SketchTune model differs from its base only in its codebooks, so an adapter is one small
safetensors file (``sketch_adapter.safetensors``: ``<module>.codebook`` tensors) plus ``sketch_adapter.json``
(bits, GPR, module list and a fingerprint of the base's packed codes). Loading copies codebooks in place, so
several adapters can be swapped over one base without reloading or re-unpacking the codes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import SketchError
from ..sketched_linear import SketchedLinear

WEIGHTS_NAME = "sketch_adapter.safetensors"
CONFIG_NAME = "sketch_adapter.json"


def sketched_modules(model: torch.nn.Module) -> dict[str, SketchedLinear]:
    found = {n: m for n, m in model.named_modules() if isinstance(m, SketchedLinear)}
    if not found:
        raise SketchError("model has no SketchedLinear layers; sketch it first (sketchtune sketch)")
    return found


def codes_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over every sketched module's name and packed codes: identifies the base an adapter fits."""
    h = hashlib.sha256()
    for name, m in sorted(sketched_modules(model).items()):
        h.update(name.encode())
        h.update(m.weight.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_adapter(model: torch.nn.Module, out_dir: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
    """Write the model's codebooks (optionally cast to ``dtype``) as a sketch adapter."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mods = sketched_modules(model)
    tensors = {f"{n}.codebook": m.codebook.detach().to(dtype or m.codebook.dtype).cpu().contiguous()
               for n, m in mods.items()}
    first = next(iter(mods.values()))
    meta = {
        "format": "sketchtune-adapter", "version": 1, "bits": first.bits, "gpr": first.gpr,
        "modules": sorted(mods), "base_fingerprint": codes_fingerprint(model),
    }
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(out / WEIGHTS_NAME)
    (out / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def load_adapter(model: torch.nn.Module, path: str | os.PathLike, check_base: bool = True) -> torch.nn.Module:
    """Copy an adapter's codebooks into ``model`` in place (dtype and device of the model's codebooks kept)."""
    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    cfg_file = (path if path.is_dir() else path.parent) / CONFIG_NAME
    if not weights.is_file():
        raise SketchError(f"no sketch adapter at {path} (expected {WEIGHTS_NAME})")
    try:
        tensors = load_file(str(weights))
        meta = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
    except Exception as e:
        raise SketchError(f"corrupt sketch adapter {weights}: {str(e).splitlines()[0]}") from None
    mods = sketched_modules(model)
    if check_base and meta.get("base_fingerprint") and meta["base_fingerprint"] != codes_fingerprint(model):
        raise SketchError(f"adapter {path} was trained on a different sketched base (codes fingerprint differs)")
    missing = [n for n in mods if f"{n}.codebook" not in tensors]
    if missing:
        raise SketchError(f"adapter {path} lacks codebooks for {len(missing)} modules, e.g. {missing[0]}")
    with torch.no_grad():
        for name, m in mods.items():
            t = tensors[f"{name}.codebook"]
            if t.shape != m.codebook.shape:
                raise SketchError(f"adapter codebook {name} has shape {tuple(t.shape)}, model has {tuple(m.codebook.shape)}")
            if not torch.isfinite(t).all():
                raise SketchError(f"adapter codebook {name} contains NaN or Inf")
            m.codebook.copy_(t)
    return model
