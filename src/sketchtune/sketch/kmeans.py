"""Weighted 1-D k-means, batched over rows.

Every row of a weight group is clustered independently into ``k`` centres, but all rows share the same
per-column importance weights (they come from the Hessian of the layer input, which does not depend on the
row). One-dimensional clustering lets us assign points by binary search over the sorted centres' midpoints
instead of materialising a (rows, points, k) distance tensor, so memory stays O(rows × points).

Lloyd's iterations alone stall in poor local optima surprisingly often in 1-D (in a third of small random
cases, some 100× off). In 1-D, optimal clusters are contiguous runs of the sorted points, so the global
optimum is a dynamic program over split points. We run that DP exactly on at most ``max_bins`` contiguous
bins of the sorted points (exact whenever the row has ≤ ``max_bins`` points), then polish with Lloyd on the
real points. The DP is batched over rows as (rows × bins × bins) tensor ops.
"""

from __future__ import annotations

import torch


def row_chunks(rows: int, points: int, elements: int = 1 << 20) -> range:
    """Starts of row blocks of about ``elements`` entries each.

    Every per-point temporary of an assignment or a Lloyd step (comparisons, int64 indices, weighted points)
    is made one block at a time: whole, a 2048 × 5632 matrix's int64 index alone is 92 MB, and a step held
    several such at once. Rows are independent, so blocking changes no result.
    """
    return range(0, rows, max(1, elements // max(points, 1)))


def assign_nearest(points: torch.Tensor, centers: torch.Tensor, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Index of the nearest centre for every point, row by row, as ``dtype``.

    ``points`` is (r, n) and ``centers`` (r, k), in any order. Ties go to the lower centre value.
    """
    sorted_centers, order = centers.sort(dim=1)
    midpoints = 0.5 * (sorted_centers[:, 1:] + sorted_centers[:, :-1])
    # slot = number of midpoints strictly below the point (searchsorted's left side). With k ≤ 16 centres,
    # k−1 vectorised compares into a uint8 count are 2.4× faster on CPU than batched torch.searchsorted.
    count_dtype = torch.uint8 if midpoints.shape[1] < 256 else torch.long
    r, n = points.shape
    out = torch.empty(points.shape, dtype=dtype, device=points.device)
    blocks = row_chunks(r, n)
    for i in blocks:
        rows = slice(i, i + blocks.step)
        part, mids = points[rows], midpoints[rows]
        slot = torch.zeros(part.shape, dtype=count_dtype, device=points.device)
        for j in range(mids.shape[1]):
            slot += part > mids[:, j : j + 1]
        out[rows] = order[rows].gather(1, slot.long())
    return out


def weighted_kmeans_1d(
    points: torch.Tensor,
    weights: torch.Tensor,
    k: int,
    max_iters: int = 50,
    max_bins: int = 32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster each row of ``points`` (r, n) into ``k`` centres, minimising Σᵢ wᵢ (xᵢ − c(xᵢ))².

    ``weights`` is (n,) or (r, n), non-negative. Returns ``(centers (r, k), assignment (r, n))``, the
    assignment as uint8 when k ≤ 256 (int64 otherwise).
    Initialisation is the binned exact DP (deterministic), so the result is a pure function of the input.
    Empty clusters are re-seeded at the point that currently costs the most in its row, which is the
    standard remedy and never increases the objective.
    """
    if points.dim() != 2:
        raise ValueError(f"points must be (rows, n), got shape {tuple(points.shape)}")
    r, n = points.shape
    x = points.float()
    # Weights shared by all rows stay one (1, n) row, broadcast: an (r, n) copy of them is 46 MB per
    # 2048 × 5632 matrix, several times over.
    w = weights.float().reshape(1, n) if weights.dim() == 1 else weights.float()
    # A zero total weight would make every centre undefined; fall back to uniform weights for such rows.
    w = torch.where(w.sum(dim=1, keepdim=True) > 0, w, torch.ones_like(w))
    w = (w.clamp_min(0) + 1e-12 * w.mean(dim=1, keepdim=True).clamp_min(1e-30)).expand(r, n)

    # Row chunks bound the (rows, bins, bins) DP tensors and the (rows, points) sort/bin temporaries to ~8 MB
    # each, small enough to be recycled by the allocator rather than mapped afresh (see :func:`row_chunks`).
    chunk = max(1, min((1 << 21) // (min(n, max_bins) + 1) ** 2, row_chunks(r, n).step))
    centers = torch.cat([_dp_init(x[i : i + chunk], w[i : i + chunk], k, max_bins) for i in range(0, r, chunk)])
    # Assignments are kept as uint8 (int64 only block by block, where scatter/gather need it): an (r, n) int64
    # tensor is 92 MB for a 2048 × 5632 matrix.
    compact = torch.uint8 if k <= 256 else torch.long
    assign = assign_nearest(x, centers, compact)
    blocks = row_chunks(r, n)
    for _ in range(max_iters):
        wsum = torch.zeros(r, k, device=x.device)
        wxsum = torch.zeros(r, k, device=x.device)
        for i in blocks:
            rows = slice(i, i + blocks.step)
            index = assign[rows].long()
            wsum[rows].scatter_add_(1, index, w[rows])
            wxsum[rows].scatter_add_(1, index, w[rows] * x[rows])
        empty = wsum <= 0
        centers = torch.where(empty, centers, wxsum / wsum.clamp_min(1e-30))
        if bool(empty.any()):
            centers = _reseed_empty(x, w, centers, assign, empty)
        new_assign = assign_nearest(x, centers, compact)
        if torch.equal(new_assign, assign):
            break
        assign = new_assign
    return centers, assign


def kmeans_cost(points: torch.Tensor, weights: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Weighted squared error of rounding every point to its nearest centre, per row."""
    q = centers.gather(1, assign_nearest(points, centers))
    return (weights * (points - q) ** 2).sum(dim=1)


def _dp_init(x: torch.Tensor, w: torch.Tensor, k: int, max_bins: int) -> torch.Tensor:
    """Globally optimal weighted k-means centres of each row, over ≤ ``max_bins`` sorted contiguous bins."""
    r, n = x.shape
    # Standardise each row so the DP can run in fp32 without cancellation in Σwx² − (Σwx)²/Σw.
    mu, sd = x.mean(dim=1, keepdim=True), x.std(dim=1, keepdim=True).clamp_min(1e-12) if n > 1 else 1.0
    xs, order = ((x - mu) / sd).sort(dim=1)
    ws = w.gather(1, order)
    ws = ws / ws.sum(dim=1, keepdim=True)
    nb = min(n, max_bins)
    bin_of = _bins(xs, nb)

    def prefix(v: torch.Tensor) -> torch.Tensor:
        sums = torch.zeros(r, nb, dtype=v.dtype, device=v.device).scatter_add_(1, bin_of, v)
        return torch.cat([torch.zeros(r, 1, dtype=v.dtype, device=v.device), sums.cumsum(dim=1)], dim=1)

    P0, P1, P2 = prefix(ws), prefix(ws * xs), prefix(ws * xs * xs)
    diff = lambda P: P[:, :, None] - P[:, None, :]  # noqa: E731  (r, j, i): sum over bins [i, j)
    d0, d1 = diff(P0), diff(P1)
    cost = (diff(P2) - d1 * d1 / d0.clamp_min(1e-30)).clamp_min(0)
    cost = cost.masked_fill(~torch.ones(nb + 1, nb + 1, dtype=torch.bool, device=x.device).tril(-1), float("inf"))
    kk = min(k, nb)
    best = cost[:, :, 0]  # one cluster over bins [0, j)
    splits = []
    for _ in range(kk - 1):
        total = best[:, None, :] + cost
        arg = total.argmin(dim=2)
        best = total.gather(2, arg[:, :, None]).squeeze(2)
        splits.append(arg)
    bounds = [torch.full((r, 1), nb, dtype=torch.long, device=x.device)]
    for arg in reversed(splits):
        bounds.append(arg.gather(1, bounds[-1]))
    bounds.append(torch.zeros(r, 1, dtype=torch.long, device=x.device))
    b = torch.cat(bounds[::-1], dim=1)  # (r, kk+1) increasing bin boundaries
    lo, hi = b[:, :-1], b[:, 1:]
    centers = (P1.gather(1, hi) - P1.gather(1, lo)) / (P0.gather(1, hi) - P0.gather(1, lo)).clamp_min(1e-30)
    centers = centers * sd + mu
    if kk < k:  # fewer distinct bins than centres: duplicates become empty clusters, reseeded by Lloyd
        centers = torch.cat([centers, centers[:, -1:].expand(r, k - kk)], dim=1)
    return centers.to(x.dtype)


def _bins(xs: torch.Tensor, nb: int) -> torch.Tensor:
    """Bin index (r, n) of sorted points: boundaries of ½·nb equal-count bins ∪ ½·nb equal-width bins.

    Equal-count bins resolve the dense middle of a weight distribution; equal-width bins give outliers bins
    of their own, so the DP can spend a centre on them (they matter most for the output error).
    """
    r, n = xs.shape
    if n <= nb:
        return torch.arange(n, device=xs.device).expand(r, n)
    half = nb // 2
    by_count = torch.arange(n, device=xs.device).expand(r, n) * half // n
    lo, hi = xs[:, :1], xs[:, -1:]
    by_width = ((xs - lo) / (hi - lo).clamp_min(1e-30) * (nb - half)).long().clamp_max(nb - half - 1)
    change = torch.zeros(r, n, dtype=torch.long, device=xs.device)
    change[:, 1:] = ((by_count[:, 1:] != by_count[:, :-1]) | (by_width[:, 1:] != by_width[:, :-1])).long()
    return change.cumsum(dim=1)


def _reseed_empty(x, w, centers, assign, empty) -> torch.Tensor:
    """Move each empty centre onto the worst-served point of its row (one per Lloyd step is enough)."""
    worst = torch.empty(x.shape[0], 1, dtype=torch.long, device=x.device)
    blocks = row_chunks(*x.shape)
    for i in blocks:
        rows = slice(i, i + blocks.step)
        err = w[rows] * (x[rows] - centers[rows].gather(1, assign[rows].long())) ** 2
        worst[rows] = err.argmax(dim=1, keepdim=True)
    first_empty = empty.float().argmax(dim=1, keepdim=True)
    rows = empty.any(dim=1, keepdim=True)
    reseeded = centers.scatter(1, first_empty, x.gather(1, worst))
    return torch.where(rows, reseeded, centers)
