"""How well do low-rank matrices vs. sketches capture a fine-tuning update ΔW? (paper §2.1, Fig. 1, Eq. 10, Thm 3.1)

For every linear layer of a (base, fully fine-tuned) pair:

* the rank needed to explain 25/50/75/90% of ΔW's energy (Σσᵢ²);
* the normalised error ‖Δ − Δ̂‖_F/‖Δ‖_F of the best rank-r approximation (truncated SVD) and of the best
  sketch approximation under the base model's code mapping — Eq. 10, δ̂ = M(MᵀM)⁻¹Mᵀδ per row, i.e. every
  entry replaced by the mean of the entries sharing its (group, code) — at equal parameter budgets
  (sketch: rows × gpr × 2^bits; rank r: r × (rows + cols));
* Theorem 3.1: fit the power-law exponent η of σᵢ², compute the compression α, and check whether the theorem's
  condition η ≤ 1 − log α / log 2α agrees with which approximation actually wins, next to the theorem's own
  predicted errors (Eqs. 7–8).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from ..layout import codebook_slots
from ..sketch.kmeans import weighted_kmeans_1d

ENERGIES = (0.25, 0.5, 0.75, 0.9)


@dataclass
class LayerDelta:
    name: str
    shape: tuple[int, int]
    rank_for_energy: dict[str, int]
    budgets: list[dict] = field(default_factory=list)
    eta: float = float("nan")
    theorem: list[dict] = field(default_factory=list)


def rank_for_energy(singular_values: torch.Tensor, energies=ENERGIES) -> dict[str, int]:
    """Smallest rank whose leading singular values hold each fraction of Σσ²."""
    e = singular_values.double() ** 2
    cum = e.cumsum(0) / e.sum().clamp_min(1e-300)
    return {f"{int(f * 100)}%": int(torch.searchsorted(cum, torch.tensor(f, dtype=cum.dtype)).item()) + 1 for f in energies}


def lowrank_error(singular_values: torch.Tensor, rank: int) -> float:
    """‖Δ − Δ_r‖_F / ‖Δ‖_F for the truncated SVD (Eckart–Young)."""
    e = singular_values.double() ** 2
    return math.sqrt(float(e[rank:].sum() / e.sum().clamp_min(1e-300)))


def sketch_projection(delta: torch.Tensor, codes: torch.Tensor, gpr: int, k: int) -> torch.Tensor:
    """Eq. 10 per row: each entry → mean of Δ over the entries of its row-group with the same code."""
    r, c = delta.shape
    slot = codebook_slots(codes, gpr, k)
    sums = torch.zeros(r, gpr * k, dtype=delta.dtype, device=delta.device).scatter_add_(1, slot, delta)
    counts = torch.zeros(r, gpr * k, dtype=delta.dtype, device=delta.device).scatter_add_(1, slot, torch.ones_like(delta))
    return (sums / counts.clamp_min(1)).gather(1, slot)


def sketch_error(delta: torch.Tensor, codes: torch.Tensor, gpr: int, k: int) -> float:
    approx = sketch_projection(delta, codes, gpr, k)
    return float((delta - approx).norm() / delta.norm().clamp_min(1e-30))


def mapping_from_weights(weight: torch.Tensor, bits: int, gpr: int) -> torch.Tensor:
    """A sketch mapping without calibration data: per row-group k-means codes of the base weights."""
    r, c = weight.shape
    groups = weight.float().reshape(r * gpr, c // gpr)
    _, assign = weighted_kmeans_1d(groups, torch.ones(c // gpr), 2**bits)
    return assign.reshape(r, c)


def power_law_exponent(singular_values: torch.Tensor) -> float:
    """η of σᵢ² ∝ i^(−η), by least squares in log–log over the non-negligible spectrum."""
    e = singular_values.double() ** 2
    e = e[e > e[0] * 1e-12]
    i = torch.arange(1, len(e) + 1, dtype=torch.float64)
    x, y = i.log(), e.log()
    slope = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    return float(-slope)


def theorem_check(singular_values: torch.Tensor, shape: tuple[int, int], params: int, measured: dict) -> dict:
    """Thm 3.1 for a budget of ``params``: α, its η threshold, predicted and measured relative errors."""
    r, c = shape
    alpha = r * c / params
    eta = power_law_exponent(singular_values)
    threshold = 1 - math.log(alpha) / math.log(2 * alpha) if alpha > 1 else float("nan")
    e = singular_values.double() ** 2
    n_lr = max(1, int(min(r, c) / (2 * alpha)))  # Eq. 7: the rank an n²/α budget buys, n/(2α)
    return {
        "params": params, "alpha": alpha, "eta": eta, "eta_threshold": threshold,
        "theorem_says_sketch_wins": bool(0 <= eta <= threshold),
        "predicted_lowrank_rel_error": math.sqrt(float(e[n_lr:].sum() / e.sum())),
        "predicted_random_sketch_rel_error": math.sqrt(max(0.0, 1 - 1 / alpha)),
        "measured_sketch_wins": measured["sketch_error"] < measured["lowrank_error"],
    }


def analyze_layer(name: str, base: torch.Tensor, tuned: torch.Tensor, mappings: dict[int, torch.Tensor],
                  bits: int) -> LayerDelta:
    """All statistics for one layer; ``mappings`` maps GPR → codes (rows, cols) of the base's sketch."""
    delta = (tuned.double() - base.double())
    r, c = delta.shape
    sv = torch.linalg.svdvals(delta)
    out = LayerDelta(name=name, shape=(r, c), rank_for_energy=rank_for_energy(sv), eta=power_law_exponent(sv))
    for gpr, codes in sorted(mappings.items()):
        params = r * gpr * 2**bits
        rank = max(1, params // (r + c))
        row = {"gpr": gpr, "params": params, "rank": rank, "lowrank_params": rank * (r + c),
               "sketch_error": sketch_error(delta, codes.to(delta.device), gpr, 2**bits),
               "lowrank_error": lowrank_error(sv, rank)}
        out.budgets.append(row)
        out.theorem.append(theorem_check(sv, (r, c), params, row))
    return out


def as_dict(layers: list[LayerDelta]) -> list[dict]:
    return [asdict(layer) for layer in layers]
