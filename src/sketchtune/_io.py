"""Atomic file writes: a reader, or a killed run's successor, sees the old file or the new one, never half of one.

Every file the library rewrites in place (a sketch's ``progress.json`` and finished layers, an adapter, an
evaluation's results JSON) goes through :func:`replace_atomically`: write a temp file beside the target, flush
it to disk, then rename it over the target, which POSIX makes atomic within one directory. The temp name
carries the pid so that two processes writing the same target cannot clobber each other's half-written temp
file; a failed write removes its temp file and leaves the target as it was. (Whole checkpoint *directories* are
swapped by :func:`sketchtune.checkpoint.write_atomically`, which builds on the same idea.)
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file


def replace_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temp path beside ``path``, flush it, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)  # the rename must not reach the disk before the data does (a power cut would leave zeros)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (see the module docstring)."""
    return replace_atomically(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: str | os.PathLike, payload: Any, indent: int = 2) -> Path:
    """Write ``payload`` as indented JSON (newline-terminated) to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(payload, indent=indent, default=str) + "\n")


def save_safetensors_atomic(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> Path:
    """``safetensors.torch.save_file`` to ``path`` atomically."""
    return replace_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
