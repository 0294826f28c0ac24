"""A sketch killed with SIGKILL continues after its last finished layer, identical to an uninterrupted run."""

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

import sketchtune
from sketchtune.cli import main
from sketchtune.errors import SketchError
from sketchtune.workflows import partial_dir

ARGS = dict(calib="c4", nsamples=8, seqlen=64, bits=3, gpr=2, seed=1)


def test_sigkill_then_resume_is_identical(tiny, tmp_path):
    model, tok = tiny
    progress = tmp_path / "partial"
    script = textwrap.dedent(f"""
        import os, signal, torch, sketchtune
        import sketchtune.sketch.pipeline as pipeline
        from sketchtune.modeling import BUNDLED_MODEL, load_model

        real, calls = pipeline.sketch_weight, []
        def dying(*a, **kw):
            calls.append(1)
            if len(calls) == 8:  # layer 0 (7 projections) is finished and written; layer 1 has begun
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **kw)
        pipeline.sketch_weight = dying
        model, tok = load_model(BUNDLED_MODEL, dtype=torch.float32)
        sketchtune.sketch_model(model, tok, progress=False, progress_dir={str(progress)!r}, **{ARGS!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (progress / "layer-00000.safetensors").is_file() and not (progress / "layer-00001.safetensors").exists()

    import copy

    resumed = copy.deepcopy(model)
    report = sketchtune.sketch_model(resumed, tok, progress=False, progress_dir=progress, resume=True, **ARGS)
    straight = copy.deepcopy(model)
    expected = sketchtune.sketch_model(straight, tok, progress=False, **ARGS)
    a, b = resumed.state_dict(), straight.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert resumed.config.quantization_config.modules == straight.config.quantization_config.modules
    assert report.module_errors == pytest.approx(expected.module_errors, rel=1e-6)

    with pytest.raises(SketchError, match=r"other settings \(bits 3 vs 4\)"):
        sketchtune.sketch_model(copy.deepcopy(model), tok, progress=False, progress_dir=progress, resume=True,
                                **{**ARGS, "bits": 4})


def test_cli_resume_rules(capsys, tmp_path):
    out = tmp_path / "sk"
    argv = ["sketch", "--out", str(out), "--eval-data", "", "--nsamples", "4", "--seqlen", "64"]
    assert main([*argv, "--resume"]) == 2
    assert "no partial sketch" in capsys.readouterr().err
    partial = partial_dir(out)
    partial.mkdir()
    (partial / "progress.json").write_text("{}")
    assert main(argv) == 2
    assert "pass --resume to continue it, or --overwrite" in capsys.readouterr().err
    assert main([*argv, "--overwrite"]) == 0  # starts over
    capsys.readouterr()
    assert not partial.exists() and (out / "model.safetensors").is_file()  # removed once the checkpoint exists
    assert "codebook" in " ".join(load_file(out / "model.safetensors"))
