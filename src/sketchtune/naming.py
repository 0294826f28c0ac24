"""Tensor names on disk vs in memory: sketched checkpoints keep transformers' own key renamings.

transformers 5 loads some architectures under other module names than their hub checkpoints use (Mixtral's
``block_sparse_moe`` is ``mlp`` in memory) and undoes the renaming on ``save_pretrained``; it also *converts*
tensors (per-expert ``w1``/``w3`` fused into one 3-D ``gate_up_proj``), which it undoes on save by splitting
them. A sketch cannot take the conversions: packed codes cannot be split like a dense tensor, so sketched
experts are stored per expert under their own keys (``<block>.gate_up_proj.<e>.weight`` / ``.codebook``). The
renamings are pure key edits, though, and keeping them makes a sketched checkpoint name its modules as the hub
checkpoint (and vLLM's model code) does — what lets vLLM serve a sketched Mixtral.

``quantization_config`` lists modules under their in-memory names; :func:`model_key` maps a stored tensor key
to that naming (what ``from_pretrained`` does), :func:`stored_key` the other way (what ``save_pretrained``
does). Architectures without renamings (most) map every key to itself.
"""

from __future__ import annotations

from functools import cache

import torch


def _renamings(model_type: str | None) -> list:
    """transformers' mapping for ``model_type`` less its converters (which would split fused tensors) and prefix
    changes; fresh objects on every call (transformers keeps state on them while it saves)."""
    if not model_type:
        return []
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightRenaming

    transforms = get_checkpoint_conversion_mapping(model_type) or []
    return [t for t in transforms if isinstance(t, WeightRenaming) and not isinstance(t, PrefixChange)]


def save_renamings(model: torch.nn.Module) -> list:
    """The renamings ``save_pretrained`` should undo for ``model``. Taken by ``model_type`` — not from the model's
    classes, which add a few more (GPT-NeoX's ``embed_out``) — so that :func:`model_key`, which has only
    config.json to go by, inverts exactly what was applied."""
    return _renamings(getattr(model.config, "model_type", None))


@cache
def _forward(model_type: str | None) -> tuple:
    return tuple(_renamings(model_type))


@cache
def _reverse(model_type: str | None) -> tuple:
    return tuple(r.reverse_transform() for r in reversed(_forward(model_type)))


def model_key(key: str, model_type: str | None) -> str:
    """The in-memory name of a tensor stored as ``key`` in a checkpoint of ``model_type``."""
    for renaming in _forward(model_type):
        key, _ = renaming.rename_source_key(key)
    return key


def stored_key(key: str, model_type: str | None) -> str:
    """The name under which the in-memory tensor (or module) ``key`` of a ``model_type`` model is stored."""
    for renaming in _reverse(model_type):
        key, _ = renaming.rename_source_key(key)
    return key
