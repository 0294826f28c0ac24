import itertools

import pytest
import torch

from sketchtune.sketch.kmeans import assign_nearest, kmeans_cost, weighted_kmeans_1d


def brute_force_cost(x: torch.Tensor, w: torch.Tensor, k: int) -> float:
    """Optimal weighted 1-D k-means cost: best split of the sorted points into k contiguous runs."""
    xs, order = x.double().sort()
    ws = w.double()[order]
    n, best = len(xs), float("inf")
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds, cost = [0, *cuts, n], 0.0
        for a, b in zip(bounds[:-1], bounds[1:]):
            m = (ws[a:b] * xs[a:b]).sum() / ws[a:b].sum()
            cost += float((ws[a:b] * (xs[a:b] - m) ** 2).sum())
        best = min(best, cost)
    return best


def test_matches_brute_force_optimum_on_tiny_inputs():
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        n = int(torch.randint(4, 11, (1,), generator=gen))
        k = int(torch.randint(2, min(n, 5) + 1, (1,), generator=gen))
        x = torch.randn(n, generator=gen) * torch.rand(1, generator=gen) * 3
        w = torch.rand(n, generator=gen) + 0.05
        centers, assign = weighted_kmeans_1d(x[None], w, k)
        got = float(kmeans_cost(x[None], w[None], centers))
        assert got <= brute_force_cost(x, w, k) * (1 + 1e-4) + 1e-9
        assert torch.equal(assign, assign_nearest(x[None], centers, assign.dtype))


def test_weights_pull_centres_towards_heavy_points():
    x = torch.tensor([[0.0, 1.0, 2.0, 10.0]])
    light = weighted_kmeans_1d(x, torch.tensor([1.0, 1.0, 1.0, 1.0]), 2)[0]
    heavy = weighted_kmeans_1d(x, torch.tensor([1.0, 1.0, 100.0, 1.0]), 2)[0]
    # With a heavy point at 2 the lower centre sits nearer 2 than the unweighted mean 1.
    assert light.min() == pytest.approx(1.0)
    assert heavy.min() > 1.9


def test_batched_rows_are_independent_and_deterministic():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 300, generator=gen)
    w = torch.rand(300, generator=gen)
    c_all, _ = weighted_kmeans_1d(x, w, 16)
    c_one, _ = weighted_kmeans_1d(x[2:3], w, 16)
    assert torch.allclose(c_all[2], c_one[0])
    assert torch.equal(weighted_kmeans_1d(x, w, 16)[0], c_all)


def test_more_centres_than_distinct_values():
    x = torch.tensor([[1.0, 1.0, 1.0, 2.0, 2.0]])
    centers, _ = weighted_kmeans_1d(x, torch.ones(5), 4)
    assert torch.isfinite(centers).all()
    assert float(kmeans_cost(x, torch.ones(1, 5), centers)) == pytest.approx(0.0, abs=1e-12)
