"""Whole-model sketching, SketchedLinear, and the checkpoint round trip on the real TinyStories-656K."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

import sketchtune
from sketchtune.eval.perplexity import perplexity
from sketchtune.sketched_linear import SketchedLinear

# Measured on this model (fp32, seqlen 128, the 6 windows of the bundled TinyStories sample; calibration
# 32 x 256 C4 tokens, seed 0; defaults: diag(U)^-3 k-means codebooks, no refit): FP 39.81, INT4 GPR1 41.89
# (1.052x FP, mean layer error 2.11e-3), INT3 GPR4 44.39, INT2 GPR1 102.2 (4.06e-2). The bounds sit ~3% above,
# so a change that costs quality fails here rather than in a benchmark weeks later.
FP_PPL = 39.81
PPL_BOUNDS = {(4, 1): (40.6, 43.2), (3, 4): (43.0, 45.8), (2, 1): (99.0, 105.3)}  # (bits, gpr): (low, high)
ERROR_BOUNDS = {(4, 1): 2.2e-3, (3, 4): 5.2e-3, (2, 1): 4.2e-2}  # mean relative layer-output error


@pytest.fixture(scope="module")
def fp_ppl(tiny):
    model, tok = tiny
    return perplexity(model, tok, "tinystories", seqlen=128, progress=False).ppl


def _sketched(tiny, **kw):
    model, tok = tiny
    m = copy.deepcopy(model)
    report = sketchtune.sketch_model(m, tok, calib="c4", nsamples=32, seqlen=256, progress=False, **kw)
    return m, report


@pytest.mark.parametrize("bits,gpr", list(PPL_BOUNDS))
def test_perplexity_within_tight_bound(tiny, fp_ppl, bits, gpr):
    assert fp_ppl == pytest.approx(FP_PPL, abs=0.01)
    m, report = _sketched(tiny, bits=bits, gpr=gpr)
    ppl = perplexity(m, tiny[1], "tinystories", seqlen=128, progress=False).ppl
    low, high = PPL_BOUNDS[(bits, gpr)]
    assert low < ppl < high
    assert len(report.module_errors) == 14 and report.mean_error < ERROR_BOUNDS[(bits, gpr)]


def test_only_decoder_linears_are_sketched(tiny):
    m, _ = _sketched(tiny, bits=3, gpr=2, method="gptq")
    sketched = [n for n, mod in m.named_modules() if isinstance(mod, SketchedLinear)]
    assert len(sketched) == 14 and all(".layers." in n for n in sketched)
    assert isinstance(m.lm_head, torch.nn.Linear) and not isinstance(m.lm_head, SketchedLinear)
    assert m.config.quantization_config.modules == sketched


def test_codebook_gradient_is_scatter_add(tiny):
    m, _ = _sketched(tiny, bits=4, gpr=2, method="rtn")
    layer = m.model.layers[0].mlp.down_proj
    x = torch.randn(3, layer.in_features)
    w_hat = layer.dequantize().detach().requires_grad_(True)
    grad_out = torch.randn(3, layer.out_features)
    (x @ w_hat.T * grad_out).sum().backward()
    layer(x).mul(grad_out).sum().backward()
    codes = layer.codes
    group = torch.arange(layer.in_features) // (layer.in_features // layer.gpr)
    expected = torch.zeros(layer.out_features, layer.gpr * 16)
    expected.scatter_add_(1, codes + group * 16, w_hat.grad)
    torch.testing.assert_close(layer.codebook.grad.reshape(layer.out_features, -1), expected)
    assert not layer.weight.requires_grad and layer.weight.dtype == torch.uint8


def test_save_from_pretrained_round_trip_is_exact(tiny, sketched_dir):
    tok = tiny[1]
    ids = tok("Once upon a time, a little dog", return_tensors="pt").input_ids
    m1, _ = sketchtune.load(sketched_dir, dtype=torch.float32)
    m2 = AutoModelForCausalLM.from_pretrained(sketched_dir, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(m1(ids).logits, m2(ids).logits)
    assert isinstance(m2.model.layers[1].mlp.up_proj, SketchedLinear)


def test_saved_model_matches_in_memory_model(tiny, tmp_path):
    m, _ = _sketched(tiny, bits=3, gpr=4)
    for p in m.parameters():  # hold what a float16 checkpoint holds, in fp32 (buffers such as RoPE untouched)
        if p.is_floating_point():
            p.data = p.data.half().float()
    sketchtune.save(m, tiny[1], tmp_path / "ck", dtype="float32")
    loaded, _ = sketchtune.load(tmp_path / "ck", dtype=torch.float32)
    ids = torch.arange(40)[None]
    with torch.no_grad():
        assert torch.equal(m(ids).logits, loaded(ids).logits)


def test_loading_without_sketchtune_fails_loudly(sketched_dir):
    code = (
        "import sys\n"
        "from transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(sketched_dir)!r})\n"
        "assert 'sketchtune' not in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "size mismatch" in proc.stderr or "mismatched" in proc.stderr.lower()


def test_cpu_runs_float16_checkpoints_in_float32(sketched_dir):
    """``sketchtune sketch`` saves float16 by default; on CPU the commands (ppl, generate, eval-tasks, train) load
    such a checkpoint in float32 — CPUs have no fast fp16 GEMM and the native kernels take fp32/bf16 only (a
    SmolLM2 training step took ~110 s in fp16, ~6 s in fp32) — while an explicit dtype is kept."""
    from sketchtune.checkpoint import run_dtype
    from sketchtune.modeling import load_model

    assert json.loads((sketched_dir / "config.json").read_text()).get("dtype") == "float16"
    assert run_dtype(sketched_dir, "auto", "cpu") == torch.float32
    assert run_dtype(sketched_dir, "auto", "cuda") == "auto"
    assert run_dtype(sketched_dir, torch.float16, "cpu") == torch.float16
    model, _ = load_model(sketched_dir)
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.float32}
    model, _ = load_model(sketched_dir, dtype=torch.float16)
    assert torch.float16 in {p.dtype for p in model.parameters()}
    model, _ = sketchtune.load(sketched_dir)  # the library entry point too, not only the CLI's loader
    assert {p.dtype for p in model.parameters() if p.is_floating_point()} == {torch.float32}
    model, _ = sketchtune.load(sketched_dir, dtype="float16")
    assert torch.float16 in {p.dtype for p in model.parameters()}
