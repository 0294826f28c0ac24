"""ΔW analysis: synthetic updates of known structure, and a real full fine-tuning pair of TinyStories-656K."""

import copy
import json

import pytest
import torch

from sketchtune.analysis.delta import (
    analyze_layer,
    lowrank_error,
    mapping_from_weights,
    rank_for_energy,
    sketch_error,
    sketch_projection,
)


def test_low_rank_delta_is_found_low_rank():
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(64, 3, generator=gen) @ torch.randn(3, 96, generator=gen)
    sv = torch.linalg.svdvals(delta.double())
    assert max(rank_for_energy(sv).values()) <= 3
    assert lowrank_error(sv, 3) < 1e-6 and lowrank_error(sv, 1) > 0.1


def test_sketch_projection_is_a_projection():
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(16, 32, generator=gen, dtype=torch.float64)
    codes = torch.randint(0, 4, (16, 32), generator=gen)
    p1 = sketch_projection(delta, codes, gpr=2, k=4)
    torch.testing.assert_close(sketch_projection(p1, codes, gpr=2, k=4), p1)
    assert sketch_error(p1, codes, 2, 4) < 1e-12  # a Δ constant on every (group, code) is captured exactly
    # The residual is orthogonal to the sketch space (Eq. 10 is the least-squares optimum).
    assert abs(float(((delta - p1) * p1).sum())) < 1e-9


def _power_law_delta(n: int, eta: float, gen) -> torch.Tensor:
    """Δ = U diag(σ) Vᵀ with σᵢ² = i^(−η) and random orthogonal U, V (Theorem 3.1's setting)."""
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    sigma = torch.arange(1, n + 1, dtype=torch.float64) ** (-eta / 2)
    return (u * sigma) @ v.T


def test_theorem_separates_full_rank_from_low_rank_updates():
    gen = torch.Generator().manual_seed(2)
    base = torch.randn(96, 96, generator=gen)
    mappings = {g: mapping_from_weights(base, 2, g) for g in (1, 4)}
    full = analyze_layer("full", base, base + _power_law_delta(96, 0.05, gen).float(), mappings, bits=2)
    low = analyze_layer("low", base, base + torch.randn(96, 2, generator=gen) @ torch.randn(2, 96, generator=gen),
                        mappings, bits=2)
    assert full.eta == pytest.approx(0.05, abs=0.01) and low.rank_for_energy["90%"] <= 2
    for t in full.theorem:
        assert t["theorem_says_sketch_wins"] and t["measured_sketch_wins"]
    for b in low.budgets:
        assert b["lowrank_error"] < 1e-6 < b["sketch_error"]


def test_analyze_delta_cli_on_a_real_fine_tuned_pair(capsys, tiny, tmp_path):
    from sketchtune.cli import main
    from sketchtune.train.data import build_dataset

    model, tok = tiny
    tuned = copy.deepcopy(model)
    data = build_dataset("tinystories", tok, cutoff_len=64)
    batch = {k: torch.tensor(data[:4][k]) for k in ("input_ids", "attention_mask", "labels")}
    opt = torch.optim.AdamW(tuned.parameters(), lr=1e-3)
    for _ in range(3):  # full fine-tuning: every weight moves
        tuned(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "tuned")
    for d in ("base", "tuned"):
        tok.save_pretrained(tmp_path / d)
    out = tmp_path / "report"
    code = main(["analyze-delta", str(tmp_path / "base"), str(tmp_path / "tuned"), "--gpr", "1,4",
                 "--max-layers", "4", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and "sketch err" in text
    res = json.loads((out / "delta_analysis.json").read_text())
    assert len(res["layers"]) == 4 and set(res["summary"]["by_gpr"]) == {"1", "4"}
    for layer in res["layers"]:
        for b in layer["budgets"]:
            assert 0 < b["sketch_error"] <= 1 and 0 < b["lowrank_error"] <= 1
    assert (out / "delta_rank.png").stat().st_size > 1000 and (out / "delta_error.png").is_file()
