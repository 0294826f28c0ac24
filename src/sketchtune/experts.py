"""``SketchedExperts``: a mixture-of-experts block's fused expert tensors, one ``SketchedLinear`` per matrix.

transformers 5 stores experts as 3-D parameters — ``gate_up_proj`` (experts × 2·inter × hidden) and
``down_proj`` (experts × hidden × inter) — and calls them as ``experts(hidden_states, top_k_index,
top_k_weights)``. This module keeps exactly that interface (so the router, generation, ``Trainer`` and
``from_pretrained`` work unchanged) while every expert matrix is a sketch whose only trainable part is its
codebooks. Its state-dict keys are ``<experts>.gate_up_proj.<e>.weight`` (packed codes) and ``.codebook``.
"""

from __future__ import annotations

import torch
from torch import nn

from .sketched_linear import SketchedLinear


def expert_shapes(module: nn.Module) -> tuple[int, int, int]:
    """(experts, hidden, intermediate) of a fused experts module or a ``SketchedExperts``."""
    if isinstance(module, SketchedExperts):
        return module.num_experts, module.hidden_dim, module.intermediate_dim
    experts, two_inter, hidden = module.gate_up_proj.shape
    return experts, hidden, two_inter // 2


class SketchedExperts(nn.Module):
    """Fused experts with every expert matrix sketched; same forward as transformers' eager experts loop."""

    def __init__(self, num_experts: int, hidden_dim: int, intermediate_dim: int, bits: int, gpr: int,
                 act_fn: nn.Module, dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden_dim, intermediate_dim
        self.gate_up_proj = nn.ModuleList(
            SketchedLinear(hidden_dim, 2 * intermediate_dim, bits, gpr, dtype=dtype, device=device)
            for _ in range(num_experts))
        self.down_proj = nn.ModuleList(
            SketchedLinear(intermediate_dim, hidden_dim, bits, gpr, dtype=dtype, device=device)
            for _ in range(num_experts))
        self.act_fn = act_fn

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for expert in hit[:, 0].tolist():
            if expert == self.num_experts:
                continue
            top_k_pos, token_idx = torch.where(mask[expert])
            gate, up = self.gate_up_proj[expert](hidden_states[token_idx]).chunk(2, dim=-1)
            out = self.down_proj[expert](self.act_fn(gate) * up)
            out = out * top_k_weights[token_idx, top_k_pos, None]
            final.index_add_(0, token_idx, out.to(final.dtype))
        return final

    def extra_repr(self) -> str:
        first = self.gate_up_proj[0]
        return (f"num_experts={self.num_experts}, hidden={self.hidden_dim}, intermediate={self.intermediate_dim}, "
                f"bits={first.bits}, gpr={first.gpr}")


def empty_like(module: nn.Module, bits: int, gpr: int) -> SketchedExperts:
    """An unfilled ``SketchedExperts`` shaped like a fused experts module (loading fills codes and codebooks)."""
    experts, hidden, inter = expert_shapes(module)
    return SketchedExperts(experts, hidden, inter, bits, gpr, module.act_fn, dtype=module.gate_up_proj.dtype,
                           device=module.gate_up_proj.device)
