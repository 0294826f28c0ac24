"""Healing: codebook distillation towards the full-precision teacher, on the bundled real model.

An INT2 sketch of TinyStories-656K is far enough from its teacher (held-out KL ≈ 0.85 nats/token) that a few
dozen steps must close part of the gap; everything but the codebooks must come out bit for bit unchanged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import sketchtune
from sketchtune.cli import main
from sketchtune.errors import SketchError
from sketchtune.modeling import BUNDLED_MODEL, load_model
from sketchtune.sketch.calibration import calibration_tokens
from sketchtune.train import HEAL_LEARNING_RATE, heal
from sketchtune.train.heal import mean_kl, token_kl
from sketchtune.workflows import heal_job

pytestmark = pytest.mark.usefixtures("one_thread")
HEAL = dict(nsamples=16, seqlen=64, max_steps=24, learning_rate=2e-3, logging_steps=4, save_steps=8,
            disable_tqdm=True)


@pytest.fixture(scope="module")
def int2_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("heal") / "int2"
    assert main(["sketch", "--bits", "2", "--out", str(out), "--nsamples", "8", "--seqlen", "64",
                 "--eval-data", "", "--threads", "1"]) == 0
    return out


def test_token_kl_is_the_kl_divergence():
    torch.manual_seed(0)
    t, s = torch.randn(2, 5, 11), torch.randn(2, 5, 11)
    forward = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1)
    reverse = F.kl_div(F.log_softmax(t, -1), F.log_softmax(s, -1), log_target=True, reduction="none").sum(-1)
    assert token_kl(t, s) == pytest.approx(forward.mean().item(), rel=1e-5)
    assert token_kl(t, s, direction="reverse") == pytest.approx(reverse.mean().item(), rel=1e-5)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]])
    assert token_kl(t, s, mask) == pytest.approx(forward[mask.bool()].mean().item(), rel=1e-5)
    assert token_kl(t, t).item() == pytest.approx(0.0, abs=1e-6)
    assert token_kl(t / 2, s / 2) == pytest.approx(token_kl(t, s, temperature=2.0).item() / 4, rel=1e-5)


def state(path):
    return load_file(str(path / "model.safetensors"))


def test_token_kl_chunks_give_the_unchunked_value_and_gradient(monkeypatch):
    """Chunked and checkpointed (memory of one chunk) — the same loss and student gradient as all at once."""
    gen = torch.Generator().manual_seed(0)
    t, s0 = torch.randn(3, 37, 50, generator=gen), torch.randn(3, 37, 50, generator=gen)
    mask = (torch.rand(3, 37, generator=gen) > 0.3).long()
    results = []
    for chunk in (10_000, 16):  # one chunk, then 7 chunks with a ragged last one
        monkeypatch.setattr(heal, "KL_CHUNK_TOKENS", chunk)
        s = s0.clone().requires_grad_()
        loss = token_kl(t, s, mask, temperature=2.0, direction="reverse")
        loss.backward()
        results.append((loss.detach(), s.grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-5, atol=1e-8)


def test_heal_lowers_heldout_kl_and_changes_only_codebooks(int2_dir, tmp_path):
    job = heal_job(int2_dir, None, tmp_path / "healed", **HEAL)
    assert job.kl_after < 0.95 * job.kl_before, (job.kl_before, job.kl_after)
    # Independently of the job's own figure: KL on other held-out windows, from the reloaded checkpoints.
    teacher, tok = load_model(BUNDLED_MODEL, dtype=torch.float32)
    held = calibration_tokens(tok, "tinystories", 8, 64, seed=7)
    before, _ = sketchtune.load(int2_dir, dtype=torch.float32)
    after, _ = sketchtune.load(tmp_path / "healed", dtype=torch.float32)
    assert mean_kl(after, teacher, held) < mean_kl(before, teacher, held)
    a, b = state(int2_dir), state(tmp_path / "healed")
    assert a.keys() == b.keys()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.endswith(".codebook") for k in changed)
    healing = after.config.quantization_config.healing
    assert healing["steps"] == 24 and healing["kl_after"] == pytest.approx(job.kl_after)
    assert healing["learning_rate"] == HEAL["learning_rate"]
    assert not (tmp_path / ".healed.healing").exists()


def test_heal_sigkill_then_resume_matches_uninterrupted(int2_dir, tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, torch
        from transformers import TrainerCallback
        torch.set_num_threads(1)
        from sketchtune.workflows import heal_job

        class Kill(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == 12:  # after checkpoint-8, before checkpoint-16
                    os.kill(os.getpid(), signal.SIGKILL)

        import sketchtune.train.trainer as trainer
        real = trainer.build_trainer
        def build(*a, **kw):
            t = real(*a, **kw)
            t.add_callback(Kill())
            return t
        trainer.build_trainer = build
        heal_job({str(int2_dir)!r}, None, {str(tmp_path / "killed")!r}, **{HEAL!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run = tmp_path / ".killed.healing"
    assert (run / "checkpoints" / "checkpoint-8").is_dir() and not (tmp_path / "killed").exists()
    with pytest.raises(SketchError, match="partial heal"):
        heal_job(int2_dir, None, tmp_path / "killed", **HEAL)
    resumed = heal_job(int2_dir, None, tmp_path / "killed", resume=True, **HEAL)
    assert resumed.resumed_from.endswith("checkpoint-8")
    straight = heal_job(int2_dir, None, tmp_path / "straight", **HEAL)
    a, b = state(tmp_path / "killed"), state(tmp_path / "straight")
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-4), k
    assert resumed.kl_after == pytest.approx(straight.kl_after, rel=1e-3)


def test_heal_refusals(capsys, int2_dir, tmp_path):
    gpt2 = tmp_path / "gpt2"
    import transformers

    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=100, n_embd=16, n_layer=1, n_head=2)
                                 ).save_pretrained(gpt2)
    with pytest.raises(SketchError, match="vocabulary"):
        heal_job(int2_dir, str(gpt2), tmp_path / "o", **HEAL)
    assert main(["heal", str(int2_dir), "--out", str(int2_dir)]) == 2  # in place needs --overwrite
    assert "already holds a sketched checkpoint" in capsys.readouterr().err
    assert main(["heal", str(int2_dir), "--out", str(tmp_path / "o2"), "--resume"]) == 2
    assert "no partial heal" in capsys.readouterr().err


def test_sketch_heal_steps_shortcut(capsys, tmp_path):
    out = tmp_path / "sk"
    assert main(["sketch", "--bits", "2", "--out", str(out), "--nsamples", "8", "--seqlen", "64",
                 "--eval-data", "", "--heal-steps", "4", "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "healed 4 steps: KL to" in printed
    model, _ = sketchtune.load(out)
    assert model.config.quantization_config.healing["steps"] == 4
    assert model.config.quantization_config.healing["learning_rate"] == HEAL_LEARNING_RATE  # as `heal` heals
    assert not (tmp_path / ".sk.healing").exists() and not (tmp_path / ".sk.partial").exists()
    assert main(["sketch", "--stream", "--heal-steps", "4", "--out", str(tmp_path / "x")]) == 2
    assert "cannot follow --stream" in capsys.readouterr().err
