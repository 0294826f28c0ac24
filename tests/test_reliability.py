"""Lose nothing, train on the right tokens, say exactly what went wrong (each case failed on an earlier main)."""

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import sketchtune
from sketchtune.cli import main
from sketchtune.errors import SketchError
from sketchtune.modeling import BUNDLED_MODEL
from sketchtune.prompts import format_prompt
from sketchtune.train.adapter import load_adapter
from sketchtune.train.data import IGNORE_INDEX, encode_example

ASSETS = Path(__file__).parent / "assets"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    return lines[0]


@pytest.fixture(scope="module")
def rtn_dir(tiny, tmp_path_factory):
    """Another sketched base of the same model (round-to-nearest codes): a different codes fingerprint."""
    import copy

    model, tok = tiny
    m = copy.deepcopy(model)
    sketchtune.sketch_model(m, tok, bits=4, gpr=1, method="rtn", progress=False)
    out = tmp_path_factory.mktemp("rtn") / "tiny-rtn"
    sketchtune.save(m, tok, out, dtype="float16")
    return out


@pytest.fixture(scope="module")
def trained_run(sketched_dir, tmp_path_factory):
    """A finished 2-step CLI run with checkpoint-2 and an adapter."""
    out = tmp_path_factory.mktemp("run") / "r"
    assert main(["train", str(sketched_dir), "--data", "tinystories", "--out", str(out), "--max-steps", "2",
                 "--save-steps", "2", "--cutoff-len", "32", "--logging-steps", "1", "--learning-rate", "1e-2"]) == 0
    return out


# ------------------------------------------------------------------------------------------- 1. no data loss


def test_sketch_refuses_foreign_directory_before_work(capsys, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    t0 = time.perf_counter()
    code, _, err = run(capsys, "sketch", "--out", out, "--eval-data", "", "--nsamples", "2", "--seqlen", "32")
    assert code == 2 and "not a sketchtune checkpoint" in error_line(err)
    assert time.perf_counter() - t0 < 5  # refused before loading or sketching
    assert (out / "notes.txt").read_text() == "my notes"


def test_save_replaces_checkpoint_only_with_overwrite(tiny, sketched_dir, tmp_path):
    model, tok = sketchtune.load(sketched_dir, dtype=torch.float32)
    out = tmp_path / "ckpt"
    shutil.copytree(sketched_dir, out)
    with pytest.raises(SketchError, match="already holds a sketched checkpoint; pass --overwrite"):
        sketchtune.save(model, tok, out)
    with torch.no_grad():
        next(m for m in model.modules() if isinstance(m, sketchtune.SketchedLinear)).codebook.add_(1.0)
    sketchtune.save(model, tok, out, overwrite=True)
    reloaded, _ = sketchtune.load(out, dtype=torch.float32)
    ids = torch.arange(1, 20)[None]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    (out / "notes.txt").write_text("mine")  # a checkpoint holding a user's file is never replaced
    with pytest.raises(SketchError, match=r"holds files sketchtune did not write \(notes.txt\)"):
        sketchtune.save(model, tok, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_cli_sketch_overwrite(capsys, tmp_path):
    out = tmp_path / "sk"
    argv = ["sketch", "--out", out, "--eval-data", "", "--nsamples", "2", "--seqlen", "32", "--method", "rtn"]
    assert run(capsys, *argv)[0] == 0
    code, _, err = run(capsys, *argv)
    assert code == 2 and "--overwrite" in error_line(err)
    code, out_text, err = run(capsys, *argv, "--overwrite")
    assert code == 0, err
    assert sketchtune.load(out)[0] is not None


# ------------------------------------------------------------------------------------ 2. resume, stale runs


def test_resume_against_other_base_refused_before_work(capsys, rtn_dir, trained_run):
    t0 = time.perf_counter()
    code, _, err = run(capsys, "train", rtn_dir, "--data", "tinystories", "--out", trained_run, "--resume",
                       "--max-steps", "4", "--cutoff-len", "32")
    assert code == 2 and "different sketched base" in error_line(err)
    assert time.perf_counter() - t0 < 10
    assert not (trained_run / "checkpoints" / "checkpoint-4").exists()


def test_fresh_run_into_old_run_refused(capsys, sketched_dir, trained_run, tmp_path):
    code, _, err = run(capsys, "train", sketched_dir, "--data", "tinystories", "--out", trained_run,
                       "--max-steps", "1", "--cutoff-len", "32")
    assert code == 2 and "already holds a training run (checkpoint-2)" in error_line(err)
    assert (trained_run / "checkpoints" / "checkpoint-2").is_dir()
    again = tmp_path / "again"
    shutil.copytree(trained_run, again)
    (again / "notes.txt").write_text("kept")
    code, _, err = run(capsys, "train", sketched_dir, "--data", "tinystories", "--out", again, "--overwrite",
                       "--max-steps", "1", "--save-steps", "5", "--cutoff-len", "32")
    assert code == 0, err
    assert not (again / "checkpoints" / "checkpoint-2").exists() and (again / "notes.txt").read_text() == "kept"


def test_resume_without_checkpoint_and_resume_message(capsys, sketched_dir, trained_run, tmp_path):
    code, _, err = run(capsys, "train", sketched_dir, "--data", "tinystories", "--out", tmp_path / "empty",
                       "--resume", "--cutoff-len", "32")
    assert code == 2 and "no complete checkpoint to resume from" in error_line(err)
    partial = tmp_path / "partial"
    (partial / "checkpoints" / "checkpoint-5").mkdir(parents=True)  # killed mid-save: no trainer_state.json
    code, _, err = run(capsys, "train", sketched_dir, "--data", "tinystories", "--out", partial, "--resume")
    assert code == 2 and "1 incomplete" in error_line(err)
    resumed = tmp_path / "resumed"
    shutil.copytree(trained_run, resumed)
    code, out, err = run(capsys, "train", sketched_dir, "--data", "tinystories", "--out", resumed, "--resume",
                         "--max-steps", "3", "--save-steps", "2", "--cutoff-len", "32", "--learning-rate", "1e-2")
    assert code == 0, err
    assert "resuming from" in out and "(step 2)" in out
    assert json.loads((resumed / "train_results.json").read_text())["global_step"] == 3


# ------------------------------------------------------------------------- 3. the first answer token trains


def _tokenizers():
    smol = ASSETS / "smollm2-135m-instruct-tokenizer"
    return {"tinystories-656k": str(BUNDLED_MODEL), "smollm2-135m": smol}


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    out = {}
    for name, src in _tokenizers().items():
        src = Path(src)
        if (src / "tokenizer.json.gz").is_file():
            dst = tmp_path_factory.mktemp(name)
            shutil.copy(src / "tokenizer_config.json", dst)
            (dst / "tokenizer.json").write_bytes(gzip.decompress((src / "tokenizer.json.gz").read_bytes()))
            src = dst
        out[name] = AutoTokenizer.from_pretrained(str(src))
    return out


@pytest.mark.parametrize("name", list(_tokenizers()))
@pytest.mark.parametrize("response", ["The sky is blue.", "1", "Yes, it is.", "42\nThe answer is 42"])
def test_every_response_token_supervised(tokenizers, name, response):
    tok = tokenizers[name]
    prompt = format_prompt("What color is the sky?")
    row = encode_example(tok, prompt, response, cutoff_len=256)
    inference_prompt = tok(prompt).input_ids
    n = len(inference_prompt)
    assert row["input_ids"][:n] == inference_prompt  # training sees the prompt exactly as inference does
    assert all(label == IGNORE_INDEX for label in row["labels"][:n])
    supervised = row["labels"][n:]
    assert supervised == row["input_ids"][n:] and IGNORE_INDEX not in supervised
    assert tok.decode(supervised, skip_special_tokens=True).strip() == response.strip()
    assert supervised[-1] == tok.eos_token_id


def test_trained_adapter_reproduces_record_from_its_prompt(capsys, sketched_dir, tmp_path):
    records = [
        {"instruction": "What color is the sky?", "input": "", "output": "The sky is blue."},
        {"instruction": "What does a dog say?", "input": "", "output": "A dog says woof."},
        {"instruction": "Name a fruit.", "input": "", "output": "An apple."},
    ]
    data = tmp_path / "tiny.json"
    data.write_text(json.dumps(records))
    run_dir = tmp_path / "r"
    code, _, err = run(capsys, "train", sketched_dir, "--data", data, "--out", run_dir, "--max-steps", "60",
                       "--learning-rate", "2e-2", "--per-device-train-batch-size", "3", "--save-steps", "1000",
                       "--lr-scheduler-type", "constant", "--logging-steps", "20")
    assert code == 0, err
    code, out, err = run(capsys, "generate", sketched_dir, "--adapter", run_dir, "--template", "alpaca",
                         "--prompt", records[0]["instruction"], "--max-new-tokens", "8")
    assert code == 0, err
    prompt = format_prompt(records[0]["instruction"])
    assert out.startswith(prompt)  # the prompt is echoed
    assert out[len(prompt):].strip().startswith("The sky is blue.")


# ----------------------------------------------------------------------------- 4. one line, the real cause


@pytest.mark.parametrize("extra,pattern", [
    (["--bf16", "--fp16"], None),  # argparse: mutually exclusive, exit 2 with usage
    (["--lr-scheduler-type", "bogus"], None),
])
def test_train_flag_errors_are_usage_errors(sketched_dir, tmp_path, extra, pattern):
    proc = subprocess.run([sys.executable, "-m", "sketchtune", "train", str(sketched_dir), "--data", "tinystories",
                           "--out", str(tmp_path / "r"), *extra], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "error:" in proc.stderr.strip().splitlines()[-1]


TRAINING_DATA_ERRORS = [  # (file, its contents, what the one error line must say)
    ("data.csv", "instruction,output\nhi,there\n", ["unsupported training data", ".json"]),
    ("bad.json", '[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]',
     ["invalid JSON at line 2"]),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": \n', ["invalid JSON on line 2"]),
    ("fields.json", json.dumps([{"prompt": "a", "completion": "b"}]),
     ["record 1: unrecognised record fields ['completion', 'prompt']"]),
    ("short.txt", "Once upon a time.", ["fewer than cutoff_len=256"]),
]


def test_training_data_errors(capsys, sketched_dir, tmp_path):
    for name, text, patterns in TRAINING_DATA_ERRORS:
        (tmp_path / name).write_text(text)
        code, _, err = run(capsys, "train", sketched_dir, "--data", tmp_path / name, "--out", tmp_path / f"run-{name}")
        line = error_line(err)
        assert code == 2 and all(p in line for p in patterns), (name, line)
    code, _, err = run(capsys, "train", sketched_dir, "--data", f"{tmp_path / 'fields.json'},tinystories", "--out",
                       tmp_path / "mixed")
    assert code == 2 and "mixes instruction records" in error_line(err)


def test_adapter_path_errors(sketched_dir, trained_run, tmp_path):
    model, _ = sketchtune.load(sketched_dir, dtype=torch.float32)
    with pytest.raises(SketchError, match="adapter's metadata file; pass its directory"):
        load_adapter(model, trained_run / "sketch_adapter.json")
    with pytest.raises(SketchError, match="not a sketch adapter: expected a run directory or a .safetensors"):
        load_adapter(model, trained_run / "loss_curve.png")
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(trained_run / "sketch_adapter.safetensors", alone)
    with pytest.raises(SketchError, match="has no sketch_adapter.json beside it"):
        load_adapter(model, alone)
    with pytest.raises(SketchError, match="no sketch adapter at"):
        load_adapter(model, tmp_path / "missing")


def test_info_on_run_directory(capsys, trained_run):
    code, _, err = run(capsys, "info", trained_run)
    assert code == 2 and "is a training run directory" in error_line(err) and "--adapter" in error_line(err)


def test_ctrl_c_during_train_names_the_kept_checkpoint(sketched_dir, tmp_path):
    out = tmp_path / "r"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}  # SIGABRT dumps every thread's stack
    # SIGINT back to its default in the child: a shell without job control starts background commands (`cmd &`)
    # with SIGINT ignored, the child inherits that, and Python then installs no KeyboardInterrupt handler — the
    # cause of this test's intermittent CI failures (train kept running, untouched by the signal).
    proc = subprocess.Popen([sys.executable, "-m", "sketchtune", "train", str(sketched_dir), "--data", "tinystories",
                             "--out", str(out), "--max-steps", "100000", "--save-steps", "2", "--cutoff-len", "32"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    try:
        # Any finished checkpoint: with --save-steps 2 and two kept, checkpoint-2 is gone again a few steps
        # later, so polling for that one name races a fast run.
        while not any((d / "trainer_state.json").is_file() for d in (out / "checkpoints").glob("checkpoint-*")):
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"no checkpoint within 120 s: {proc.communicate()[1][-2000:]}")
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # seen intermittently in CI: say where the child waits
            proc.send_signal(signal.SIGABRT)
            pytest.fail(f"train did not exit within 120 s of SIGINT; its stacks:\n{proc.communicate()[1][-6000:]}")
    finally:
        if proc.poll() is None:  # never leave a 100000-step run behind a failed assertion
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130
    line = error_line(err)
    assert "interrupted" in line and "checkpoint-" in line and "--resume" in line and "nothing was written" not in line


def test_config_with_bad_bits_is_one_clear_line(capsys, sketched_dir, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(sketched_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 7
    (bad / "config.json").write_text(json.dumps(cfg))
    code, out, err = run(capsys, "ppl", bad, "--data", "tinystories", "--seqlen", "64")
    assert code == 2 and "bits must be one of (2, 3, 4), got 7" in error_line(err)
    assert "mismatch" not in (out + err).lower()
    from transformers import AutoModelForCausalLM

    with pytest.raises(SketchError, match="bits must be one of"):  # the plain transformers path refuses too
        AutoModelForCausalLM.from_pretrained(bad)


# ------------------------------------------------------------------ 5. analyze-delta on what we produce


def test_analyze_delta_sketched_base_and_adapter(capsys, sketched_dir, trained_run, tmp_path):
    code, out, err = run(capsys, "analyze-delta", sketched_dir, trained_run, "--out", tmp_path / "d", "--no-plots")
    assert code == 0, err
    res = json.loads((tmp_path / "d" / "delta_analysis.json").read_text())
    assert len(res["layers"]) == 14
    for layer in res["layers"]:  # ΔW lies in the base's sketch space: Eq. 10 reproduces it exactly
        assert layer["budgets"][0]["sketch_error"] < 1e-6
        assert 0 < layer["budgets"][0]["lowrank_error"] <= 1
    code, _, err = run(capsys, "analyze-delta", BUNDLED_MODEL, sketched_dir, "--out", tmp_path / "e", "--no-plots")
    assert code == 2 and "pass the sketched base as BASE" in error_line(err)


def test_analyze_delta_checks_matplotlib_first(capsys, monkeypatch, sketched_dir, trained_run, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = run(capsys, "analyze-delta", sketched_dir, trained_run, "--out", tmp_path / "d")
    assert code == 2 and "plots need matplotlib" in error_line(err)
    assert not (tmp_path / "d").exists()  # refused before the analysis ran


# ---------------------------------------------------------------------------- 6. calibration length capped


def test_library_caps_calibration_at_context(tiny):
    import copy

    model, tok = tiny
    m = copy.deepcopy(model)
    assert m.config.max_position_embeddings == 512
    sketchtune.sketch_model(m, tok, calib="c4", nsamples=2, seqlen=2048, progress=False)
    assert m.config.quantization_config.calibration["seqlen"] == 512


# ------------------------------------------------------------------------------------------ small things


def test_version_help_and_echo(capsys, sketched_dir, trained_run):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"sketchtune {sketchtune.__version__}"
    for command, flag in (("train", "--num-train-epochs"), ("train", "--save-steps"), ("ppl", "--batch-size"),
                          ("generate", "--max-new-tokens"), ("generate", "--temperature")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        raw = capsys.readouterr().out
        entry = raw[raw.index(f"\n  {flag} "):]  # the option's own entry, not the usage line
        entry = " ".join(entry[: entry.find("\n  -", 3)].split())
        assert "(default:" in entry, (command, flag, entry)
    code, out, _ = run(capsys, "info", sketched_dir)
    assert "source model" in out and "c4: 16 x 128 tokens, seed 0" in out


def test_train_writes_numbers_and_loss_curve(trained_run):
    assert (trained_run / "loss_curve.png").stat().st_size > 1000
    results = json.loads((trained_run / "train_results.json").read_text())
    assert isinstance(results["train_loss"], float)


def test_train_log_lines_are_numbers(capsys, sketched_dir, tmp_path):
    code, out, err = run(capsys, "train", sketched_dir, "--data", "tinystories", "--out", tmp_path / "r",
                         "--max-steps", "2", "--cutoff-len", "32", "--logging-steps", "1", "--save-steps", "10")
    assert code == 0
    logs = out + err
    assert "'loss': '" not in logs and re.search(r"\bloss \d+\.\d+ ", logs)


def test_likelihood_fallback_is_said(capsys, sketched_dir):
    code, _, err = run(capsys, "eval-tasks", sketched_dir, "--tasks", "AddSub,boolq", "--data-dir", "bundled",
                       "--limit", "1", "--mode", "likelihood", "--max-new-tokens", "4")
    assert code == 0 and "falling back to generation for AddSub" in err


def test_threads_option(capsys, sketched_dir):
    before = torch.get_num_threads()
    code, out, _ = run(capsys, "ppl", sketched_dir, "--data", "tinystories", "--seqlen", "64", "--max-windows", "1",
                       "--threads", "1")
    assert code == 0 and torch.get_num_threads() == before  # restored after the command
    from sketchtune.threads import free_cores

    assert 1 <= free_cores() <= os.cpu_count()
