"""The sketching algorithm on real TinyStories-656K weights and real calibration Hessians."""

import pytest
import torch

from sketchtune.errors import SketchError
from sketchtune.sketch.algorithm import (
    importance_weights,
    output_error,
    prepare_hessian,
    round_to_nearest,
    sketch_weight,
    uniform_codebook,
)

NAMES = ["self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bits,gpr", [(4, 1), (3, 4), (2, 1)])
def test_mapping_beats_nearest_rounding_with_same_codebooks(layer0_hessians, name, bits, gpr):
    W, H = layer0_hessians[0][name]
    res = sketch_weight(W, H, bits, gpr)
    assert res.codes.dtype == torch.uint8 and res.codes.shape == W.shape
    assert res.codebook.shape == (W.shape[0], gpr, 2**bits)
    nearest = round_to_nearest(W, bits, gpr, codebook=res.codebook)
    assert output_error(W, res.dequantize(), H) < output_error(W, nearest.dequantize(), H)


@pytest.mark.parametrize("name", NAMES)
def test_refit_lowers_layer_output_error(layer0_hessians, name):
    W, H = layer0_hessians[0][name]
    plain = sketch_weight(W, H, 3, 1)
    refit = sketch_weight(W, H, 3, 1, refit=True)
    assert torch.equal(plain.codes, refit.codes)  # refit only moves codebooks
    assert output_error(W, refit.dequantize(), H) < output_error(W, plain.dequantize(), H)


def test_sketch_beats_gptq_and_rtn_at_equal_bits(layer0_hessians):
    for name in NAMES:
        W, H = layer0_hessians[0][name]
        sk = output_error(W, sketch_weight(W, H, 3, 1).dequantize(), H)
        gptq = output_error(W, sketch_weight(W, H, 3, 1, codebook_fn=uniform_codebook).dequantize(), H)
        rtn = output_error(W, round_to_nearest(W, 3, 1).dequantize(), H)
        assert sk < gptq < rtn


def test_more_groups_and_bits_lower_error(layer0_hessians):
    W, H = layer0_hessians[0]["mlp.down_proj"]
    err = {(b, g): output_error(W, sketch_weight(W, H, b, g).dequantize(), H) for b in (2, 3, 4) for g in (1, 4)}
    assert err[(4, 1)] < err[(3, 1)] < err[(2, 1)]
    for b in (2, 3, 4):
        assert err[(b, 4)] < err[(b, 1)]


def test_shared_hessians_for_same_input(layer0_hessians):
    _, H = layer0_hessians
    assert H["self_attn.k_proj"] is H["self_attn.v_proj"] is H["self_attn.q_proj"]
    assert H["mlp.up_proj"] is H["mlp.gate_proj"]
    assert len({id(h) for h in H.values()}) == 4  # qkv, o, gate/up, down


def test_deterministic(layer0_hessians):
    W, H = layer0_hessians[0]["self_attn.q_proj"]
    a, b = sketch_weight(W, H, 4, 2, refit=True), sketch_weight(W, H, 4, 2, refit=True)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.codebook, b.codebook)


def test_dead_columns_are_exact_and_harmless(layer0_hessians):
    W, H = layer0_hessians[0]["self_attn.q_proj"]
    H = H.clone()
    H[:5, :] = 0
    H[:, :5] = 0
    res = sketch_weight(W, H, 4, 1)
    assert torch.isfinite(res.codebook).all()
    live = output_error(W[:, 5:], res.dequantize()[:, 5:], H[5:, 5:])
    assert live < output_error(W[:, 5:], round_to_nearest(W, 4, 1).dequantize()[:, 5:], H[5:, 5:])


def test_rank_deficient_hessian_is_damped(layer0_hessians):
    W, _ = layer0_hessians[0]["self_attn.q_proj"]
    x = torch.randn(W.shape[1], 3)
    res = sketch_weight(W, 2 * x @ x.T, 4, 1)  # rank 3: singular without damping
    assert torch.isfinite(res.codebook).all()


def test_bad_inputs_raise_clear_errors(layer0_hessians):
    W, H = layer0_hessians[0]["self_attn.q_proj"]
    with pytest.raises(SketchError, match="NaN"):
        bad = W.clone()
        bad[0, 0] = float("nan")
        sketch_weight(bad, H)
    with pytest.raises(SketchError, match="singular"):
        sketch_weight(W, -torch.eye(W.shape[1]))
    with pytest.raises(SketchError, match="bits"):
        sketch_weight(W, H, bits=5)
    with pytest.raises(SketchError, match="divisor"):
        sketch_weight(W, H, gpr=3)
    with pytest.raises(SketchError, match="shape"):
        sketch_weight(W, H[:10, :10])


def test_importance_definitions_match_their_formulas(layer0_hessians):
    """paper: (1/[H⁻¹]ᵢᵢ)^s; cholesky (LeanQuant): diag(U)^-s with U = chol(H⁻¹) upper; both scaled to max 1."""
    W, H = layer0_hessians[0]["self_attn.q_proj"]
    _, Hd, U = prepare_hessian(W, H)
    hinv_diag = torch.diag(torch.linalg.inv(Hd.double()))
    for s in (1.0, 3.0):
        paper = (1 / hinv_diag) ** s
        chol = torch.diag(U).double() ** -s
        torch.testing.assert_close(importance_weights(U, s, "paper").double(), paper / paper.max(), rtol=1e-3, atol=1e-6)
        torch.testing.assert_close(importance_weights(U, s, "cholesky").double(), chol / chol.max(), rtol=1e-3, atol=1e-6)
    assert not torch.allclose(importance_weights(U, 3.0, "paper"), importance_weights(U, 3.0, "cholesky"))
    assert torch.equal(importance_weights(U, 0.0, "paper"), torch.ones(U.shape[0]))
    with pytest.raises(SketchError, match="importance"):
        importance_weights(U, 3.0, "diag")


def test_default_importance_beats_unweighted_kmeans(layer0_hessians):
    """The default (diag(U)^-3) k-means weighting lowers the layer-output error against s = 0 on real layers."""
    for name in NAMES:
        W, H = layer0_hessians[0][name]
        weighted = output_error(W, sketch_weight(W, H, 3, 1).dequantize(), H)
        unweighted = output_error(W, sketch_weight(W, H, 3, 1, s=0.0).dequantize(), H)
        assert weighted < unweighted, name


def test_nan_hessian_and_short_calibration_text(layer0_hessians, tiny, tmp_path):
    from sketchtune.sketch.calibration import calibration_tokens

    W, H = layer0_hessians[0]["self_attn.q_proj"]
    bad = H.clone()
    bad[3, 3] = float("nan")
    with pytest.raises(SketchError, match="Hessian contains NaN or Inf"):
        sketch_weight(W, bad)
    short = tmp_path / "short.txt"
    short.write_text("Once upon a time there was a cat.")
    with pytest.raises(SketchError, match=r"calibration text has \d+ tokens, fewer than seqlen=128"):
        calibration_tokens(tiny[1], short, nsamples=4, seqlen=128)
