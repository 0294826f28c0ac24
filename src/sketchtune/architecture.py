"""Finding what to sketch in a Hugging Face causal LM: its decoder layers and the linears inside them.

Bottom-floor helpers that depend on nothing else in the package, so the HF integration, the sketch pipeline
and the loaders can all use them without importing each other.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import SketchError
from .sketched_linear import SketchedLinear

#: Modules that are one dense projection y = xWᵀ + b: ``nn.Linear``, and GPT-2-style ``Conv1D`` (W stored
#: transposed, in × out). Both are sketched the same way.
PROJECTIONS = (nn.Linear, Conv1D)


def find_decoder_layers(model: nn.Module, sketched: bool = False) -> tuple[str, nn.ModuleList]:
    """The ``ModuleList`` of decoder blocks: as long as ``config.num_hidden_layers`` and holding linears.

    Works for Llama, Mistral, Qwen2, SmolLM2, Phi-3 and any model following the usual layout, without a
    per-architecture table. ``sketched=True`` also finds them once their linears are ``SketchedLinear``.
    """
    kinds = PROJECTIONS + (SketchedLinear,) if sketched else PROJECTIONS
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and (n_layers is None or len(module) == n_layers):
            if any(isinstance(m, kinds) for m in module[0].modules()):
                return name, module
    arch = type(model).__name__
    raise SketchError(f"unsupported architecture {arch}: no decoder layers with linear projections found")


def linear_modules(layer: nn.Module) -> dict[str, nn.Module]:
    """Every projection (``nn.Linear`` or ``Conv1D``) inside one decoder layer, by its name relative to the layer."""
    return {name: m for name, m in layer.named_modules() if isinstance(m, PROJECTIONS)}


def projection_weight(module: nn.Module) -> torch.Tensor:
    """The projection's weight as (out_features, in_features), whatever way the module stores it."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def projection_shape(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a projection."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]
    return module.in_features, module.out_features


def is_fused_experts(module: nn.Module) -> bool:
    """A Mixtral-style experts module: 3-D ``gate_up_proj`` and ``down_proj``, an ``act_fn``, no biases."""
    gu, dn = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gu, nn.Parameter) and isinstance(dn, nn.Parameter) and gu.dim() == 3 and dn.dim() == 3):
        return False
    experts, two_inter, hidden = gu.shape
    shapes_fit = dn.shape == (experts, hidden, two_inter // 2) and two_inter % 2 == 0
    biased = any("bias" in n for n, _ in module.named_parameters(recurse=False))
    return shapes_fit and hasattr(module, "act_fn") and not biased


def fused_expert_modules(layer: nn.Module) -> dict[str, nn.Module]:
    """Mixture-of-experts modules with fused 3-D expert tensors inside one decoder layer, by relative name."""
    return {name: m for name, m in layer.named_modules() if is_fused_experts(m)}


def unsketchable_matrices(layer: nn.Module, prefix: str = "") -> dict[str, str]:
    """Weight matrices (≥ 2-D parameters) inside a decoder layer that no projection owns, with the reason."""
    left = {}
    for mod_name, module in layer.named_modules():
        if isinstance(module, (*PROJECTIONS, SketchedLinear)):
            continue
        for p_name, param in module.named_parameters(recurse=False):
            if param.dim() < 2:
                continue
            if "router" in type(module).__name__.lower():
                why = "mixture-of-experts router: kept dense (routing decisions are sensitive, and it is tiny)"
            elif param.dim() == 3:
                why = ("fused mixture-of-experts tensor in a layout sketchtune does not sketch (only bias-free "
                       "gate_up_proj / down_proj experts are)")
            else:
                why = f"{param.dim()}-D parameter of {type(module).__name__}, not an nn.Linear / Conv1D"
            left[f"{prefix}{mod_name + '.' if mod_name else ''}{p_name}"] = why
    return left


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted path ``name`` under ``root`` (``nn.Module`` has a getter, not a setter)."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
