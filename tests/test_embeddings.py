"""Sketched token embeddings and LM head (``sketch_model(embeddings=True)``, ``--sketch-embeddings``).

On the real TinyStories-656K (tied head, vocabulary table 40% of its weights): one table serves the lookups and
the logits, the checkpoint holds it once, perplexity stays near the decoder-only sketch's, fine-tuning leaves it
frozen, and damaged checkpoints fail with one line. Every architecture family in ``test_architectures`` is
checked for the plumbing: lookups, Gemma-3's row scale, tied and untied heads and reloading.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open

import sketchtune
from sketchtune.errors import SketchError
from sketchtune.eval.perplexity import perplexity
from sketchtune.sketched_embedding import SketchedEmbedding
from sketchtune.sketched_linear import SketchedLinear
from sketchtune.train.adapter import sketched_modules
from sketchtune.train.trainer import prepare_for_training

pytestmark = pytest.mark.usefixtures("one_thread")
SKETCH = dict(calib="c4", nsamples=16, seqlen=128, bits=4, gpr=1, progress=False)


@pytest.fixture(scope="module")
def pair(tiny):
    """The bundled model sketched twice with the same settings: decoder only, and with its embeddings."""
    model, tok = tiny
    plain, full = copy.deepcopy(model), copy.deepcopy(model)
    sketchtune.sketch_model(plain, tok, **SKETCH)
    report = sketchtune.sketch_model(full, tok, **SKETCH, embeddings=True)
    return plain.eval(), full.eval(), report


def test_one_table_serves_lookups_and_logits(pair, tiny):
    plain, full, report = pair
    table, head = full.model.embed_tokens, full.lm_head
    assert isinstance(table, SketchedEmbedding) and isinstance(head, SketchedLinear)
    assert head.weight is table.weight and head.codebook is table.codebook  # tied, as the dense model was
    assert full.config.quantization_config.embeddings == {"input": "model.embed_tokens", "output": "lm_head",
                                                          "tied": True, "bits": 4, "gpr": 1}
    assert 0 < report.module_errors["lm_head"] < 0.02  # relative output error on the calibration states
    ids = torch.tensor([[1, 5, 77, 2047, 0, 5]])
    dense_table = table.dequantize()
    assert torch.equal(table(ids), torch.nn.functional.embedding(ids, dense_table))
    # The decoder layers are the same sketch either way (embeddings come after them), so the decoder-only model
    # carrying the dequantized table as its dense embedding must give the very same logits.
    ref = copy.deepcopy(plain)
    with torch.no_grad():
        ref.model.embed_tokens.weight.copy_(dense_table)
        torch.testing.assert_close(full(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    dense_rows = tiny[0].model.embed_tokens.weight
    rel = (dense_table - dense_rows).norm() / dense_rows.norm()
    assert 0 < rel < 0.15, rel


def test_smaller_checkpoint_perplexity_near_the_decoder_only_sketch(pair, tiny, tmp_path):
    plain, full, _ = pair
    _, tok = tiny
    sizes = {}
    for name, m in (("plain", plain), ("full", full)):
        sketchtune.save(copy.deepcopy(m), tok, tmp_path / name, dtype="float32")
        sizes[name] = (tmp_path / name / "model.safetensors").stat().st_size
    with safe_open(str(tmp_path / "full" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.codebook" in keys and not any(k.startswith("lm_head") for k in keys)
    # 2048 × 128 fp32 table (1 MB) → 4-bit codes + 16 codebook entries a row (0.26 MB): measured 1.42 → 0.63 MB.
    assert sizes["full"] < 0.5 * sizes["plain"], sizes
    ppl = {n: perplexity(m, tok, "tinystories", 256, 20, progress=False).ppl for n, m in (("plain", plain),
                                                                                          ("full", full))}
    assert ppl["full"] < 1.10 * ppl["plain"], ppl  # measured 40.6 → 42.2 (+4%)
    reloaded, _ = sketchtune.load(tmp_path / "full", dtype=torch.float32)
    assert reloaded.lm_head.codebook is reloaded.model.embed_tokens.codebook
    ids = torch.arange(3, 60)[None]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, full(ids).logits)


def test_fine_tuning_and_adapters_leave_the_table_frozen(pair):
    _, full, _ = pair
    model = copy.deepcopy(full)
    mods = sketched_modules(model)
    assert "lm_head" not in mods and all(".layers." in n for n in mods)
    trainable = prepare_for_training(model)
    assert trainable == sum(m.codebook.numel() for m in mods.values())
    assert not model.model.embed_tokens.codebook.requires_grad
    ids = torch.arange(3, 40)[None]
    model.train()
    model(ids, labels=ids).loss.backward()
    assert model.model.embed_tokens.codebook.grad is None
    assert all(m.codebook.grad is not None and m.codebook.grad.abs().sum() > 0 for m in mods.values())


def test_table_with_its_own_bits_and_gpr(tiny, tmp_path):
    model, tok = tiny
    m = copy.deepcopy(model)
    sketchtune.sketch_model(m, tok, **SKETCH, embeddings=True, embedding_bits=3, embedding_gpr=4)
    table = m.model.embed_tokens
    assert (table.bits, table.gpr, m.lm_head.bits, m.lm_head.gpr) == (3, 4, 3, 4)
    assert table.codebook.shape == (2048, 4, 8) and m.lm_head.codebook is table.codebook
    assert all(lin.bits == 4 and lin.gpr == 1 for lin in sketched_modules(m).values())
    sketchtune.save(m, tok, tmp_path / "ck", dtype="float32")
    reloaded, _ = sketchtune.load(tmp_path / "ck", dtype=torch.float32)
    ids = torch.arange(3, 60)[None]
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, m.eval()(ids).logits)
    with pytest.raises(SketchError, match="embeddings: gpr=3 must be a positive divisor of the row length 128"):
        sketchtune.sketch_model(copy.deepcopy(model), tok, **SKETCH, embeddings=True, embedding_gpr=3)
    low = copy.deepcopy(model)  # INT2 layers: the table gets 4 bits unless told otherwise
    sketchtune.sketch_model(low, tok, **{**SKETCH, "bits": 2}, embeddings=True)
    assert (low.model.embed_tokens.bits, low.model.embed_tokens.gpr) == (4, 1)
    assert all(lin.bits == 2 for lin in sketched_modules(low).values())


def test_damaged_embeddings_checkpoint_is_one_line(pair, tiny, tmp_path):
    _, full, _ = pair
    out = tmp_path / "ck"
    sketchtune.save(copy.deepcopy(full), tiny[1], out, dtype="float32")
    cfg_file = out / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["quantization_config"]["embeddings"]["input"] = "model.no_such_table"
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(SketchError, match="corrupt checkpoint: tensor model.no_such_table.weight is missing"):
        sketchtune.load(out)
    cfg["quantization_config"]["embeddings"] = {"input": "model.embed_tokens", "tied": "yes"}
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(SketchError, match="quantization_config.embeddings must be"):
        sketchtune.load(out)
    cfg["quantization_config"]["embeddings"] = {"input": "model.embed_tokens", "output": "lm_head", "tied": True,
                                                "bits": 5}
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(SketchError, match="corrupt checkpoint: quantization_config.embeddings: bits must be one of"):
        sketchtune.load(out)


def test_stream_and_bad_table_layout_refused_before_work(capsys, tmp_path):
    from sketchtune.cli import main

    assert main(["sketch", "--stream", "--sketch-embeddings", "--out", str(tmp_path / "x")]) != 0
    assert "--sketch-embeddings cannot be combined with --stream" in capsys.readouterr().err
    assert main(["sketch", "--embedding-bits", "5", "--out", str(tmp_path / "x")]) != 0
    assert "error: embeddings: bits must be one of (2, 3, 4), got 5" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_sketch_train_generate_with_sketched_embeddings(capsys, tmp_path):
    """The whole CLI path on a sketch with its table sketched: sketch → train (adapter) → generate → info."""
    from sketchtune.cli import main

    ck, run = tmp_path / "ck", tmp_path / "run"
    assert main(["sketch", "--sketch-embeddings", "--out", str(ck), "--nsamples", "8", "--seqlen", "128",
                 "--eval-windows", "2"]) == 0
    assert "embeddings: model.embed_tokens (tied lm_head) sketched at INT4 GPR 1" in capsys.readouterr().out
    assert main(["train", str(ck), "--data", "tinystories", "--out", str(run), "--max-steps", "2",
                 "--cutoff-len", "32", "--logging-steps", "1"]) == 0
    with safe_open(str(run / "sketch_adapter.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert keys and not any(k.startswith(("lm_head", "model.embed_tokens")) for k in keys)
    capsys.readouterr()
    assert main(["generate", str(ck), "--adapter", str(run), "--max-new-tokens", "5"]) == 0
    assert main(["info", str(ck)]) == 0
    assert "embeddings" in capsys.readouterr().out
