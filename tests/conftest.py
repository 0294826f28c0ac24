"""Shared fixtures: the bundled real TinyStories-656K model, its real calibration Hessians, a sketched copy."""

from __future__ import annotations

import os

import torch

# Without a GPU the Triton kernel tests run under Triton's interpreter, which must be switched on before anything
# imports triton (bitsandbytes and transformers' Trainer do) — so here, before any test module is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import sketchtune  # noqa: E402
from sketchtune.architecture import find_decoder_layers  # noqa: E402
from sketchtune.modeling import BUNDLED_MODEL, load_model  # noqa: E402
from sketchtune.sketch.calibration import calibration_tokens, collect_hessians  # noqa: E402


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (restored after): for modules of many tiny ops, where OpenMP barriers cost
    more than the work — seconds per test when another job holds a core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the real pretrained TinyStories-656K, fp32 on CPU."""
    torch.manual_seed(0)
    return load_model(BUNDLED_MODEL, dtype=torch.float32)


@pytest.fixture(scope="session")
def layer0_hessians(tiny):
    """Real calibration Hessians of decoder layer 0 (C4 text), keyed by linear name: {name: (W, H)}, and the
    raw ``collect_hessians`` result (shared Hessians are the same tensor)."""
    model, tok = tiny
    _, layers = find_decoder_layers(model)
    tokens = calibration_tokens(tok, "c4", nsamples=16, seqlen=128, seed=0)
    hessians = collect_hessians(layers[0], tokens.split(8), forward=lambda ids: model(input_ids=ids))
    linears = {n: m for n, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    return {n: (m.weight.detach().clone(), hessians[n]) for n, m in linears.items()}, hessians


@pytest.fixture(scope="session")
def sketched_dir(tiny, tmp_path_factory):
    """TinyStories-656K sketched at INT4 GPR1 and saved (fp16) — shared by the round-trip and CLI tests."""
    import copy

    model, tok = tiny
    m = copy.deepcopy(model)
    sketchtune.sketch_model(m, tok, calib="c4", nsamples=16, seqlen=128, bits=4, gpr=1, progress=False)
    out = tmp_path_factory.mktemp("ckpt") / "tiny-int4"
    sketchtune.save(m, tok, out, dtype="float16")
    return out
