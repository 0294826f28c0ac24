"""Finding what to sketch in a Hugging Face causal LM: its decoder layers and the linears inside them.

Bottom-floor helpers that depend on nothing else in the package, so the HF integration, the sketch pipeline
and the loaders can all use them without importing each other.
"""

from __future__ import annotations

from torch import nn

from .errors import SketchError


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
    """Put ``new`` at the dotted path ``name`` under ``root`` (``nn.Module`` has a getter, not a setter)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
