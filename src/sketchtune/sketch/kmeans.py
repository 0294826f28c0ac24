"""Weighted 1-D k-means, batched over rows.

Every row of a weight group is clustered independently into ``k`` centres, but all rows share the same
per-column importance weights (they come from the Hessian of the layer input, which does not depend on the
row). One-dimensional clustering lets us assign points by binary search over the sorted centres' midpoints
instead of materialising a (rows, points, k) distance tensor, so memory stays O(rows × points).
"""

from __future__ import annotations

import torch


def assign_nearest(points: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centre for every point, row by row.

    ``points`` is (r, n) and ``centers`` (r, k), in any order. Ties go to the lower centre value.
    """
    sorted_centers, order = centers.sort(dim=1)
    midpoints = 0.5 * (sorted_centers[:, 1:] + sorted_centers[:, :-1])
    slot = torch.searchsorted(midpoints.contiguous(), points.contiguous())
    return order.gather(1, slot)


def weighted_kmeans_1d(
    points: torch.Tensor,
    weights: torch.Tensor,
    k: int,
    max_iters: int = 50,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster each row of ``points`` (r, n) into ``k`` centres, minimising Σᵢ wᵢ (xᵢ − c(xᵢ))².

    ``weights`` is (n,) or (r, n), non-negative. Returns ``(centers (r, k), assignment (r, n) int64)``.
    Initialisation is deterministic (weighted quantiles), so the result is a pure function of the input.
    Empty clusters are re-seeded at the point that currently costs the most in its row, which is the
    standard remedy and never increases the objective.
    """
    if points.dim() != 2:
        raise ValueError(f"points must be (rows, n), got shape {tuple(points.shape)}")
    r, n = points.shape
    x = points.float()
    w = weights.float().expand(r, n) if weights.dim() == 1 else weights.float()
    # A zero total weight would make every centre undefined; fall back to uniform weights for such rows.
    w = torch.where(w.sum(dim=1, keepdim=True) > 0, w, torch.ones_like(w))
    w = w.clamp_min(0) + 1e-12 * w.mean(dim=1, keepdim=True).clamp_min(1e-30)

    centers = _weighted_quantile_init(x, w, k)
    assign = assign_nearest(x, centers)
    for _ in range(max_iters):
        wsum = torch.zeros(r, k, device=x.device).scatter_add_(1, assign, w)
        wxsum = torch.zeros(r, k, device=x.device).scatter_add_(1, assign, w * x)
        empty = wsum <= 0
        centers = torch.where(empty, centers, wxsum / wsum.clamp_min(1e-30))
        if bool(empty.any()):
            centers = _reseed_empty(x, w, centers, assign, empty)
        new_assign = assign_nearest(x, centers)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return centers, assign


def kmeans_cost(points: torch.Tensor, weights: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Weighted squared error of rounding every point to its nearest centre, per row."""
    q = centers.gather(1, assign_nearest(points, centers))
    return (weights * (points - q) ** 2).sum(dim=1)


def _weighted_quantile_init(x: torch.Tensor, w: torch.Tensor, k: int) -> torch.Tensor:
    """Centres at the weighted (j + ½)/k quantiles: a 1-D analogue of k-means++ that needs no randomness."""
    xs, order = x.sort(dim=1)
    cw = w.gather(1, order).cumsum(dim=1)
    cw = cw / cw[:, -1:]
    targets = (torch.arange(k, device=x.device, dtype=x.dtype) + 0.5) / k
    idx = torch.searchsorted(cw.contiguous(), targets.expand(x.shape[0], k).contiguous())
    return xs.gather(1, idx.clamp_max(x.shape[1] - 1))


def _reseed_empty(x, w, centers, assign, empty) -> torch.Tensor:
    """Move each empty centre onto the worst-served point of its row (one per Lloyd step is enough)."""
    err = w * (x - centers.gather(1, assign)) ** 2
    worst = err.argmax(dim=1, keepdim=True)
    first_empty = empty.float().argmax(dim=1, keepdim=True)
    rows = empty.any(dim=1, keepdim=True)
    reseeded = centers.scatter(1, first_empty, x.gather(1, worst))
    return torch.where(rows, reseeded, centers)
