"""Tests that protect the numbers: independent references for Algorithm 1, k-means, refit and packing.

Each reference below is written from the paper / textbook definition, not from our implementation, and runs
on real TinyStories-656K weights with real calibration Hessians (``layer0_hessians``): float64, one column at a
time, H⁻¹ itself instead of its Cholesky factor, no blocks. ``benchmarks/mutation_check.py`` applies the
mutations these tests were written against (deleted error updates, halved compensation, codebooks on the
uncompensated weights, a weaker k-means, a large ridge, reversed packing order) and shows each is caught.
"""

import pytest
import torch

from sketchtune.layout import pack_codes, unpack_codes
from sketchtune.sketch.algorithm import importance_weights, prepare_hessian, sketch_weight
from sketchtune.sketch.kmeans import kmeans_cost, weighted_kmeans_1d

ROWS = 32  # rows of each real matrix used (the reference is an O(c³) loop per matrix)


# Thousands of tiny ops: one thread avoids OpenMP barriers, which cost seconds when a core is busy.
pytestmark = pytest.mark.usefixtures("one_thread")


def reference_sketch(W: torch.Tensor, H: torch.Tensor, bits: int, gpr: int, s: float = 3.0,
                     importance: str = "cholesky", percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """Algorithm 1 as the paper states it (OBS form of GPTQ), naively, in float64.

    For each group: learn the codebook by weighted k-means on the group's *current* (error-compensated)
    weights; then for each column j: map to the nearest entry, e = (w − q)/[H⁻¹]ⱼⱼ, push −e·H⁻¹[j, j:] into
    the remaining columns and eliminate j from H⁻¹ (H⁻¹ ← H⁻¹ − H⁻¹[:, j]H⁻¹[j, :]/[H⁻¹]ⱼⱼ). The Cholesky
    importance diag(U)ᵢ⁻ˢ is computed from the same elimination's pivots ([H⁻¹]ᵢᵢ after eliminating < i = Uᵢᵢ²).
    """
    W = W.double().clone()
    H = H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += percdamp * torch.diag(H).mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    r, c = W.shape
    k, group = 2**bits, c // gpr
    A, pivots = Hinv.clone(), torch.empty(c, dtype=H.dtype)
    for j in range(c):
        pivots[j] = A[j, j]
        A -= torch.outer(A[:, j], A[j, :]) / A[j, j]
    imp = pivots ** (-s / 2) if importance == "cholesky" else (1 / torch.diag(Hinv)) ** s
    imp = imp / imp.max()
    codes = torch.empty(r, c, dtype=torch.long)
    codebooks = torch.empty(r, gpr, k, dtype=torch.float64)
    A = Hinv.clone()
    for g in range(gpr):
        cols = slice(g * group, (g + 1) * group)
        cb = weighted_kmeans_1d(W[:, cols].float(), imp[cols].float(), k)[0].double()
        codebooks[:, g] = cb
        for j in range(g * group, (g + 1) * group):
            idx = (W[:, j, None] - cb).abs().argmin(dim=1)
            e = (W[:, j] - cb.gather(1, idx[:, None]).squeeze(1)) / A[j, j]
            W[:, j:] -= e[:, None] * A[j, j:][None, :]
            A -= torch.outer(A[:, j], A[j, :]) / A[j, j]
            codes[:, j] = idx
    return codebooks, codes


def _matrix(layer0_hessians, name):
    W, H = layer0_hessians[0][name]
    return W[:ROWS], H


# Cases where float32 (ours) and float64 (reference) give the same k-means codebooks, so the comparison is
# exact. (mlp.down_proj at INT4 GPR4 is not among them: one of its 96-point groups sits at a near-tie between
# two k-means segmentations that 1e-7 of rounding flips.)
CASES = [("self_attn.q_proj", 4, 1), ("self_attn.q_proj", 3, 2), ("self_attn.o_proj", 2, 4),
         ("self_attn.o_proj", 4, 4), ("mlp.down_proj", 4, 1), ("mlp.down_proj", 3, 2), ("mlp.down_proj", 2, 4)]


@pytest.mark.parametrize("name,bits,gpr", CASES)
def test_sketch_weight_matches_naive_float64_algorithm_1(layer0_hessians, name, bits, gpr):
    W, H = _matrix(layer0_hessians, name)
    ref_codebook, ref_codes = reference_sketch(W, H, bits, gpr)
    got = sketch_weight(W, H, bits, gpr)
    assert torch.equal(got.codes.long(), ref_codes), f"{(got.codes.long() != ref_codes).sum()} codes differ"
    torch.testing.assert_close(got.codebook.double(), ref_codebook, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name,bits,gpr", [("mlp.down_proj", 4, 1), ("mlp.down_proj", 3, 2)])
def test_paper_importance_matches_reference(layer0_hessians, name, bits, gpr):
    W, H = _matrix(layer0_hessians, name)
    _, ref_codes = reference_sketch(W, H, bits, gpr, s=2.0, importance="paper")
    assert torch.equal(sketch_weight(W, H, bits, gpr, s=2.0, importance="paper").codes.long(), ref_codes)


@pytest.mark.parametrize("bits,gpr", [(4, 1), (3, 2), (2, 4)])
def test_blocksize_invariance(layer0_hessians, bits, gpr):
    """Lazy blocks are an implementation detail: 1, 7, 32, 128 and 384 columns give identical codes."""
    W, H = _matrix(layer0_hessians, "mlp.down_proj")  # 384 columns: several blocks at every size but 384
    results = {b: sketch_weight(W, H, bits, gpr, blocksize=b) for b in (1, 7, 32, 128, 384)}
    for b, res in results.items():
        assert torch.equal(res.codes, results[128].codes), f"blocksize {b}"
        torch.testing.assert_close(res.codebook, results[128].codebook, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------- k-means


def exact_kmeans_cost(points: torch.Tensor, weights: torch.Tensor, k: int) -> torch.Tensor:
    """Optimal weighted 1-D k-means cost of each row: O(n²k) DP over split points of the sorted row, float64."""
    x = points.double()
    w = weights.double().expand_as(x)
    xs, order = x.sort(dim=1)
    ws = w.gather(1, order)
    r, n = xs.shape
    zero = torch.zeros(r, 1, dtype=torch.float64)
    P0, P1, P2 = (torch.cat([zero, v.cumsum(1)], 1) for v in (ws, ws * xs, ws * xs * xs))

    def seg(P):  # [row, j, i]: sum over sorted points [i, j)
        return P[:, :, None] - P[:, None, :]

    cost = (seg(P2) - seg(P1) ** 2 / seg(P0).clamp_min(1e-300)).clamp_min(0)
    cost = cost.masked_fill(~torch.ones(n + 1, n + 1, dtype=torch.bool).tril(-1), float("inf"))
    best = cost[:, :, 0]
    for _ in range(k - 1):
        best = (best[:, None, :] + cost).min(dim=2).values
    return best[:, n]


def test_exact_dp_reference_agrees_with_brute_force():
    from itertools import combinations

    gen = torch.Generator().manual_seed(3)
    x, w = torch.randn(1, 9, generator=gen), torch.rand(9, generator=gen) + 0.1
    xs, order = x[0].double().sort()
    ws = w.double()[order]
    brute = min(sum(float((ws[a:b] * (xs[a:b] - (ws[a:b] * xs[a:b]).sum() / ws[a:b].sum()) ** 2).sum())
                    for a, b in zip((0, *cuts), (*cuts, 9))) for cuts in combinations(range(1, 9), 2))
    assert float(exact_kmeans_cost(x, w, 3)[0]) == pytest.approx(brute, rel=1e-9)


# Mean / max excess of the fast path (binned DP + Lloyd) over the exact optimum on 64 real rows with the
# default importance, measured: q_proj (128 points) k=4 0.15% / 1.5%, k=8 1.3% / 12%, k=16 8.0% / 31%;
# down_proj (384 points) k=4 0.12% / 1.6%, k=8 0.83% / 7.1%, k=16 5.7% / 22%. The allowance is ~25% above.
# Without Lloyd's refinement the means double (k=16: 17% and 12%).
ALLOWED_EXCESS = {  # (module, k): (mean, max)
    ("self_attn.q_proj", 4): (0.002, 0.02), ("self_attn.q_proj", 8): (0.017, 0.15),
    ("self_attn.q_proj", 16): (0.10, 0.38), ("mlp.down_proj", 4): (0.0016, 0.02),
    ("mlp.down_proj", 8): (0.011, 0.09), ("mlp.down_proj", 16): (0.072, 0.28),
}


@pytest.mark.parametrize("name,k", list(ALLOWED_EXCESS))
def test_fast_kmeans_within_stated_excess_of_exact_optimum(layer0_hessians, name, k):
    W, H = layer0_hessians[0][name]
    W = W[:64]
    _, _, U = prepare_hessian(W, H)
    imp = importance_weights(U, 3.0, "cholesky")
    exact = exact_kmeans_cost(W, imp, k)
    centers, _ = weighted_kmeans_1d(W, imp, k)
    fast = kmeans_cost(W.float(), imp.expand_as(W), centers).double()
    excess = fast / exact - 1
    assert excess.min() > -1e-4  # nothing beats the optimum
    mean_bound, max_bound = ALLOWED_EXCESS[(name, k)]
    assert excess.mean() <= mean_bound and excess.max() <= max_bound, (float(excess.mean()), float(excess.max()))


# ---------------------------------------------------------------------------------------------- refit


def _objective_grad(W, Hd, codes, codebook):
    cb = codebook.double().clone().requires_grad_(True)
    r, gpr, k = cb.shape
    c = codes.shape[1]
    slot = codes.long() + torch.arange(c) // (c // gpr) * k
    D = W.double() - cb.reshape(r, gpr * k).gather(1, slot)
    (0.5 * ((D @ Hd.double()) * D).sum()).backward()
    return cb.grad


@pytest.mark.parametrize("name,bits,gpr", [("self_attn.q_proj", 3, 1), ("mlp.down_proj", 4, 2)])
def test_refit_is_stationary_point(layer0_hessians, name, bits, gpr):
    """∂/∂codebook of ½·tr(DHDᵀ) (D = W − Ŵ, the damped H refit solves with) vanishes at the refit solution."""
    W, H = _matrix(layer0_hessians, name)
    plain = sketch_weight(W, H, bits, gpr)
    refit = sketch_weight(W, H, bits, gpr, refit=True)
    assert torch.equal(plain.codes, refit.codes)
    _, Hd, _ = prepare_hessian(W, H)
    g0 = _objective_grad(W, Hd, plain.codes, plain.codebook).norm()
    g1 = _objective_grad(W, Hd, refit.codes, refit.codebook).norm()
    assert g1 < 1e-2 * g0, (float(g1), float(g0))


# -------------------------------------------------------------------------------------------- packing

# Fixed codes 0, 1, …, 15 (mod 2^bits) in one row of 16, packed little-endian: code j of each 8-code run
# at bits [j·bits, (j+1)·bits) of the run's integer, runs in order, no padding bits.
PINNED = {
    2: "e4e4e4e4",
    3: "88c6fa88c6fa",
    4: "1032547698badcfe",
}


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_packing_format_is_pinned(bits):
    codes = (torch.arange(16) % 2**bits)[None]
    packed = pack_codes(codes, bits)
    assert bytes(packed[0].tolist()).hex() == PINNED[bits]
    assert torch.equal(unpack_codes(packed, bits, 16), codes)


def test_packing_pads_with_zero_codes():
    codes = torch.tensor([[3, 1, 2]])
    assert bytes(pack_codes(codes, 2)[0].tolist()).hex() == "27" + "00"  # 3 | 1<<2 | 2<<4 = 0x27, then padding
