"""Streaming sketch: one decoder layer in memory at a time, and the very same checkpoint as the in-memory sketch.

The source checkpoints are written by ``save_pretrained`` in small shards, so a layer's tensors are spread over
several files and MoE experts are stored per expert (transformers fuses them on load) — exactly what a hub
checkpoint looks like. Peak memory is measured by ``benchmarks/streaming_sketch.py``, not here.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from test_architectures import MOE, build, build_moe
from transformers import AutoModelForCausalLM, AutoTokenizer

import sketchtune
from sketchtune.bundled import BUNDLED_MODEL
from sketchtune.cli import main
from sketchtune.errors import SketchError
from sketchtune.sketch.streaming import StreamedModel, write_streamed_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
ARGS = dict(calib="c4", nsamples=4, seqlen=64, bits=4, gpr=1, progress=False)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(BUNDLED_MODEL)


def checkpoint_state(path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [
        "model.safetensors"]
    state = {}
    for f in files:
        state.update(load_file(str(path / f)))
    return state


def sketch_both_ways(model, tok, tmp_path, **args):
    """(in-memory checkpoint, streamed checkpoint, streamed report) for the same saved source model."""
    model.save_pretrained(tmp_path / "src", max_shard_size="100KB")
    assert len(list((tmp_path / "src").glob("*.safetensors"))) >= 3
    whole = AutoModelForCausalLM.from_pretrained(tmp_path / "src", dtype=torch.float32).eval()
    sketchtune.sketch_model(whole, tok, **{**ARGS, **args})
    sketchtune.save(whole, tok, tmp_path / "mem", dtype="float32")
    streamed = StreamedModel(tmp_path / "src")
    outside_in_memory = []  # per load_layer call: is anything outside the decoder (embeddings, head) in memory?
    load_layer = streamed.load_layer

    def watched(index, layer):
        outside_in_memory.append(any(not p.is_meta for n, p in streamed.model.named_parameters()
                                     if not n.startswith(streamed.prefix + ".")))
        load_layer(index, layer)

    streamed.load_layer = watched
    report = sketchtune.sketch_model(streamed.model, tok, stream=streamed, progress_dir=tmp_path / "partial",
                                     **{**ARGS, **args})
    layers = streamed.model.get_submodule(streamed.prefix)
    assert all(p.is_meta for p in layers.parameters())  # nothing of the decoder stays in memory
    # the embeddings are read for the calibration capture only, never again while the layers are sketched
    assert outside_in_memory[0] and not any(outside_in_memory[1:]), outside_in_memory
    write_streamed_checkpoint(streamed, tmp_path / "partial", tok, tmp_path / "str", dtype="float32")
    return tmp_path / "mem", tmp_path / "str", report


@pytest.mark.parametrize("name", ["llama", "gemma3", "gpt2", "mixtral", "qwen3_moe"])
def test_streamed_checkpoint_equals_in_memory_sketch(name, tok, tmp_path):
    model = build_moe(name) if name in MOE else build(name)
    mem, streamed, report = sketch_both_ways(model, tok, tmp_path)
    a, b = checkpoint_state(mem), checkpoint_state(streamed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    n_shards = len(json.loads((streamed / "model.safetensors.index.json").read_text())["weight_map"].values())
    assert n_shards == len(a)
    reloaded = AutoModelForCausalLM.from_pretrained(streamed, dtype=torch.float32).eval()
    ids = torch.arange(5, 45)[None]
    with torch.no_grad():
        logits = reloaded(ids).logits
        assert torch.equal(logits, AutoModelForCausalLM.from_pretrained(mem, dtype=torch.float32).eval()(ids).logits)
    assert json.loads((streamed / "config.json").read_text())["quantization_config"]["modules"] == \
        json.loads((mem / "config.json").read_text())["quantization_config"]["modules"]
    assert len(report.module_errors) > 0


def test_bf16_source_keeps_16_bit_embeddings_and_the_same_result(tok, tmp_path):
    """The embedding table stays bf16 in memory (half the bytes) yet the layers see the fp32 path's numbers."""
    model = build("llama").to(torch.bfloat16)
    mem, streamed, _ = sketch_both_ways(model, tok, tmp_path)
    a, b = checkpoint_state(mem), checkpoint_state(streamed)
    assert all(torch.equal(a[k], b[k]) for k in a) and a.keys() == b.keys()
    opened = StreamedModel(tmp_path / "src")
    opened.load_outside()
    assert opened.model.get_input_embeddings().weight.dtype == torch.bfloat16


def test_cli_stream_on_bundled_model_matches_in_memory(capsys, tmp_path):
    """Tied embeddings stored under the LM head's name; the CLI's streamed checkpoint equals the in-memory one."""
    common = ["--nsamples", "8", "--seqlen", "64", "--eval-data", ""]
    assert main(["sketch", "--out", str(tmp_path / "mem"), *common]) == 0
    assert main(["sketch", "--stream", "--out", str(tmp_path / "str"), *common]) == 0
    out = capsys.readouterr().out
    assert "streamed: perplexity and sample skipped" in out
    a, b = checkpoint_state(tmp_path / "mem"), checkpoint_state(tmp_path / "str")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / ".str.partial").exists()
    model, _ = sketchtune.load(tmp_path / "str")  # validated, sharded
    assert sum(isinstance(m, sketchtune.SketchedLinear) for m in model.modules()) == 14


def test_streamed_sigkill_then_resume_is_identical(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        import sketchtune.sketch.pipeline as pipeline
        real, calls = pipeline.sketch_weight, []
        def dying(*a, **kw):
            calls.append(1)
            if len(calls) == 8:  # layer 0 is written, layer 1 has begun
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **kw)
        pipeline.sketch_weight = dying
        from sketchtune.cli import main
        sys.exit(main(["sketch", "--stream", "--out", {str(tmp_path / "str")!r}, "--nsamples", "8",
                       "--seqlen", "64", "--eval-data", ""]))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    partial = tmp_path / ".str.partial"
    assert (partial / "layer-00000.safetensors").is_file() and not (partial / "layer-00001.safetensors").exists()
    assert main(["sketch", "--stream", "--resume", "--out", str(tmp_path / "str"), "--nsamples", "8",
                 "--seqlen", "64", "--eval-data", ""]) == 0
    assert main(["sketch", "--stream", "--out", str(tmp_path / "ref"), "--nsamples", "8", "--seqlen", "64",
                 "--eval-data", ""]) == 0
    a, b = checkpoint_state(tmp_path / "str"), checkpoint_state(tmp_path / "ref")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stream_refuses_what_it_cannot_read(capsys, tmp_path, tok):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(SketchError, match="dequantized whole"):
        StreamedModel(gguf)
    (tmp_path / "nosafe").mkdir()
    build("llama").config.save_pretrained(tmp_path / "nosafe")
    with pytest.raises(SketchError, match="needs safetensors weights"):
        StreamedModel(tmp_path / "nosafe")
    build("llama").save_pretrained(tmp_path / "gap", max_shard_size="200KB")
    shard = sorted((tmp_path / "gap").glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(SketchError, match=f"weight shard {shard.name} is missing"):
        StreamedModel(tmp_path / "gap")
    assert main(["sketch", str(gguf), "--stream", "--out", str(tmp_path / "o")]) == 2
    assert "dequantized whole" in capsys.readouterr().err
