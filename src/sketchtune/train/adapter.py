"""Sketch adapters: the trained codebooks alone, loadable onto the sketched base they were trained from.

A fine-tuned SketchTune model differs from its base only in its codebooks, so an adapter is one small
safetensors file (``sketch_adapter.safetensors``: ``<module>.codebook`` tensors) plus ``sketch_adapter.json``
(module list and a fingerprint of the base's packed codes; the layout is the base's). Loading copies codebooks in place, so
several adapters can be swapped over one base without reloading or re-unpacking the codes.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .._io import save_safetensors_atomic, write_json_atomic
from ..checkpoint import model_type_of, weight_files
from ..errors import SketchError
from ..naming import model_key
from ..sketched_linear import SketchedLinear

WEIGHTS_NAME = "sketch_adapter.safetensors"
CONFIG_NAME = "sketch_adapter.json"


def sketched_modules(model: torch.nn.Module) -> dict[str, SketchedLinear]:
    """The decoder layers' sketched linears: what fine-tuning trains and an adapter holds.

    A sketched LM head (``--sketch-embeddings``) is not among them: it stays frozen, as a dense head does, and
    a tied one is the embedding table itself."""
    spec = getattr(getattr(getattr(model, "config", None), "quantization_config", None), "embeddings", None)
    head = spec["output"] if isinstance(spec, dict) else None
    found = {n: m for n, m in model.named_modules() if isinstance(m, SketchedLinear) and n != head}
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


def save_adapter(model: torch.nn.Module, out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
                 codebooks: dict[str, torch.Tensor] | None = None) -> Path:
    """Write the model's codebooks (optionally cast to ``dtype``) as a sketch adapter.

    ``codebooks`` (module name → whole codebook) replaces reading them from the modules, for a model whose
    codebooks are sharded across processes (FSDP: see :func:`sketchtune.train.distributed.full_codebooks`).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mods = sketched_modules(model)
    books = codebooks if codebooks is not None else {n: m.codebook.detach() for n, m in mods.items()}
    tensors = {f"{n}.codebook": books[n].to(dtype or books[n].dtype).cpu().contiguous() for n in mods}
    meta = {
        "format": "sketchtune-adapter", "version": 1, "modules": sorted(mods),
        "base_fingerprint": codes_fingerprint(model),
    }
    save_safetensors_atomic(tensors, out / WEIGHTS_NAME, metadata={"format": "pt"})
    write_json_atomic(out / CONFIG_NAME, meta)
    return out


def checkpoint_codes_fingerprint(path: str | os.PathLike, names: list[str]) -> str | None:
    """:func:`codes_fingerprint` of the packed codes stored in a checkpoint directory (``None`` if any is missing).

    Reads only the ``<module>.weight`` tensors of ``names``, so it is cheap even for a Trainer checkpoint.
    """
    where: dict[str, tuple[Path, str]] = {}  # in-memory key → (file, stored key)
    model_type = model_type_of(path)
    for f in weight_files(Path(path)):
        if not f.is_file():
            return None
        with safe_open(str(f), framework="pt") as st:
            where.update({model_key(k, model_type): (f, k) for k in st.keys()})
    h = hashlib.sha256()
    for name in sorted(names):
        f, key = where.get(f"{name}.weight", (None, None))
        if f is None:
            return None
        with safe_open(str(f), framework="pt") as st:
            h.update(name.encode())
            h.update(st.get_tensor(key).contiguous().numpy().tobytes())
    return h.hexdigest()


def _adapter_files(path: Path) -> tuple[Path, Path]:
    """(weights, metadata) of an adapter given as a run directory or as its ``.safetensors`` file."""
    if path.is_dir():
        return path / WEIGHTS_NAME, path / CONFIG_NAME
    if not path.exists():
        raise SketchError(f"no sketch adapter at {path}: no such file or directory")
    if path.name == CONFIG_NAME or path.suffix == ".json":
        raise SketchError(f"{path} is an adapter's metadata file; pass its directory or {WEIGHTS_NAME}")
    if path.suffix != ".safetensors":
        raise SketchError(f"{path} is not a sketch adapter: expected a run directory or a .safetensors file")
    return path, path.parent / CONFIG_NAME


def load_adapter(model: torch.nn.Module, path: str | os.PathLike, check_base: bool = True) -> torch.nn.Module:
    """Copy an adapter's codebooks into ``model`` in place (dtype and device of the model's codebooks kept).

    The adapter's ``sketch_adapter.json`` is required: its fingerprint of the base's codes is what guarantees
    the codebooks are applied to the codes they were trained with (``check_base=False`` skips the comparison).
    """
    path = Path(path).expanduser()
    weights, cfg_file = _adapter_files(path)
    if not weights.is_file():
        raise SketchError(f"no sketch adapter at {path} (expected {WEIGHTS_NAME})")
    if not cfg_file.is_file():
        raise SketchError(f"sketch adapter {weights} has no {CONFIG_NAME} beside it; "
                          "cannot check which base it was trained on")
    try:
        meta = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise SketchError(f"corrupt sketch adapter: {cfg_file} is not valid JSON ({e.msg})") from None
    if not isinstance(meta, dict) or meta.get("format") != "sketchtune-adapter":
        raise SketchError(f"corrupt sketch adapter: {cfg_file} is not a sketchtune adapter description")
    try:
        tensors = load_file(str(weights))
    except Exception as e:
        raise SketchError(f"corrupt sketch adapter {weights}: {str(e).splitlines()[0]}") from None
    mods = sketched_modules(model)
    if check_base and meta.get("base_fingerprint") != codes_fingerprint(model):
        raise SketchError(f"adapter {path} was trained on a different sketched base (codes fingerprint differs)")
    missing = [n for n in mods if f"{n}.codebook" not in tensors]
    if missing:
        raise SketchError(f"adapter {path} lacks codebooks for {len(missing)} modules, e.g. {missing[0]}")
    for name, m in mods.items():  # every check before the first copy: a refused adapter changes nothing
        t = tensors[f"{name}.codebook"]
        if t.shape != m.codebook.shape:
            raise SketchError(f"adapter codebook {name} has shape {tuple(t.shape)}, "
                              f"model has {tuple(m.codebook.shape)}")
        if not torch.isfinite(t).all():
            raise SketchError(f"adapter codebook {name} contains NaN or Inf")
    with torch.no_grad():
        for name, m in mods.items():
            m.codebook.copy_(tensors[f"{name}.codebook"])
    return model
