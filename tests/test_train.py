"""Codebook fine-tuning on the real sketched TinyStories-656K: what trains, that it learns, resume, adapters."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import sketchtune
from sketchtune.errors import SketchError
from sketchtune.prompts import format_prompt
from sketchtune.train.adapter import load_adapter, save_adapter
from sketchtune.train.data import (
    IGNORE_INDEX,
    build_dataset,
    load_instruction_data,
    tokenize_instructions,
)
from sketchtune.train.trainer import prepare_for_training, train_sketch

TRAIN_ARGS = dict(max_steps=4, per_device_train_batch_size=2, logging_steps=1, save_steps=2, learning_rate=5e-3,
                  seed=7, use_cpu=True, disable_tqdm=True, save_total_limit=None)


@pytest.fixture
def base(sketched_dir):
    return sketchtune.load(sketched_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def lm_data(tiny):
    return build_dataset("tinystories", tiny[1], cutoff_len=32)


def _losses(metrics):
    return {h["step"]: h["loss"] for h in metrics["log_history"] if "loss" in h}


def test_only_codebooks_change(base, lm_data, tmp_path):
    model, tok = base
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = prepare_for_training(model)
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert all(n.endswith(".codebook") for n, p in model.named_parameters() if p.requires_grad)
    train_sketch(model, tok, lm_data, tmp_path / "run", **{**TRAIN_ARGS, "max_steps": 2, "save_steps": 10})
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k].to(before[k].dtype))}
    assert changed and all(k.endswith(".codebook") for k in changed)
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n.endswith(".codebook"))


def test_one_step_lowers_loss_on_fixed_batch(base, lm_data):
    model, _ = base
    prepare_for_training(model)
    batch = {k: torch.tensor(lm_data[:4][k]) for k in ("input_ids", "attention_mask", "labels")}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss0 = model(**batch).loss
    loss0.backward()
    opt.step()
    with torch.no_grad():
        assert model(**batch).loss < loss0


def test_resume_after_sigkill_reproduces_next_loss(sketched_dir, base, lm_data, tmp_path):
    model, tok = base
    reference = _losses(train_sketch(model, tok, lm_data, tmp_path / "ref", **TRAIN_ARGS))
    run = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal, torch, sketchtune
        from transformers import TrainerCallback
        from sketchtune.train.data import build_dataset
        from sketchtune.train.trainer import train_sketch

        class Kill(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == 3:  # after checkpoint-2, before checkpoint-4
                    os.kill(os.getpid(), signal.SIGKILL)

        model, tok = sketchtune.load({str(sketched_dir)!r}, dtype=torch.float32)
        data = build_dataset("tinystories", tok, cutoff_len=32)
        train_sketch(model, tok, data, {str(run)!r}, callbacks=[Kill()], **{TRAIN_ARGS!r})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert (run / "checkpoints" / "checkpoint-2").is_dir() and not (run / "train_results.json").exists()
    model2, tok2 = sketchtune.load(sketched_dir, dtype=torch.float32)
    resumed = train_sketch(model2, tok2, lm_data, run, resume=True, **TRAIN_ARGS)
    assert resumed["resumed_from"].endswith("checkpoint-2")
    got = _losses(resumed)
    for step in (3, 4):
        assert got[step] == pytest.approx(reference[step], rel=1e-4)


def test_adapter_save_load_swap(sketched_dir, lm_data, tmp_path):
    ids = torch.arange(1, 30)[None]
    logits = {}
    for name, lr in (("a", 5e-3), ("b", 2e-2)):
        model, tok = sketchtune.load(sketched_dir, dtype=torch.float32)
        train_sketch(model, tok, lm_data, tmp_path / name, **{**TRAIN_ARGS, "learning_rate": lr, "save_steps": 10})
        with torch.no_grad():
            logits[name] = model(ids).logits
    base, _ = sketchtune.load(sketched_dir, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(ids).logits
        for name in ("a", "b", "a"):
            load_adapter(base, tmp_path / name)
            torch.testing.assert_close(base(ids).logits, logits[name], rtol=0, atol=1e-5)
    assert not torch.allclose(base_logits, logits["a"])
    assert (tmp_path / "a" / "sketch_adapter.safetensors").stat().st_size < 0.5 * (sketched_dir / "model.safetensors").stat().st_size


def test_adapter_rejects_other_base(tiny, tmp_path, sketched_dir):
    import copy

    model, tok = tiny
    other = copy.deepcopy(model)
    sketchtune.sketch_model(other, tok, nsamples=4, seqlen=64, bits=4, gpr=1, method="rtn", progress=False)
    save_adapter(other, tmp_path / "other")
    base, _ = sketchtune.load(sketched_dir, dtype=torch.float32)
    with pytest.raises(SketchError, match="different sketched base"):
        load_adapter(base, tmp_path / "other")


def test_instruction_formatting_masks_prompt(tiny, tmp_path):
    tok = tiny[1]
    recs = [{"instruction": "Add 2 and 3.", "input": "", "output": "Two and three make five. The answer is 5", "answer": "5"},
            {"question": "Tom has 3 apples and buys 2. How many?", "answer": "3+2=<<3+2=5>>5\n#### 5"}]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in recs))
    ds = load_instruction_data(str(path))
    assert ds[1]["output"].endswith("The answer is 5") and "<<" not in ds[1]["output"]
    enc = tokenize_instructions(ds, tok, cutoff_len=256)
    row = enc[0]
    n_prompt = len(tok(format_prompt(recs[0]["instruction"])).input_ids)
    assert all(l == IGNORE_INDEX for l in row["labels"][:n_prompt])
    assert row["labels"][n_prompt:] == row["input_ids"][n_prompt:]
    assert tok.decode(row["input_ids"][n_prompt:], skip_special_tokens=True).strip().startswith("Two and three make five")


def test_cli_train_then_generate_with_adapter(capsys, sketched_dir, tmp_path):
    from sketchtune.cli import main

    code = main(["train", str(sketched_dir), "--data", "tinystories", "--out", str(tmp_path / "r"), "--max-steps", "2",
                 "--cutoff-len", "32", "--logging-steps", "1", "--device", "cpu"])
    out = capsys.readouterr().out
    assert code == 0 and "codebook parameters" in out
    code = main(["generate", str(sketched_dir), "--adapter", str(tmp_path / "r"), "--max-new-tokens", "5"])
    assert code == 0
    assert main(["train", str(sketched_dir), "--data", "/no/such.json", "--out", str(tmp_path / "x")]) == 2


def test_apply_adapter_writes_the_tuned_model_as_one_checkpoint(capsys, sketched_dir, tmp_path):
    """``apply-adapter`` merges a run's codebooks into a full sketched checkpoint (what vLLM loads): the same
    logits as base + adapter, the base's codes untouched; a foreign adapter or an occupied --out is refused."""
    from sketchtune.cli import main

    assert main(["train", str(sketched_dir), "--data", "tinystories", "--out", str(tmp_path / "r"), "--max-steps",
                 "3", "--cutoff-len", "32", "--learning-rate", "1e-2", "--device", "cpu"]) == 0
    assert main(["apply-adapter", str(sketched_dir), str(tmp_path / "r"), "--out", str(tmp_path / "full"),
                 "--dtype", "float32"]) == 0
    merged, _ = sketchtune.load(tmp_path / "full", dtype=torch.float32)
    base, _ = sketchtune.load(sketched_dir, dtype=torch.float32)
    ids = torch.arange(1, 30)[None]
    with torch.no_grad():
        before = base(ids).logits
        load_adapter(base, tmp_path / "r")
        torch.testing.assert_close(merged(ids).logits, base(ids).logits, rtol=0, atol=1e-5)
    assert not torch.allclose(before, merged(ids).logits.detach())
    for (name, a), (_, b) in zip(merged.named_modules(), base.named_modules()):
        if hasattr(a, "codebook"):
            assert torch.equal(a.weight, b.weight), name  # packed codes are the base's
    capsys.readouterr()
    assert main(["apply-adapter", str(sketched_dir), str(tmp_path / "r"), "--out", str(tmp_path / "full")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "sketch_adapter.safetensors").write_bytes(b"not safetensors")
    assert main(["apply-adapter", str(sketched_dir), str(tmp_path / "other"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()  # nothing written for a bad adapter


def test_trl_sft_trainer_trains_only_codebooks(base, tmp_path):
    trl = pytest.importorskip("trl")
    from datasets import Dataset

    model, tok = base
    prepare_for_training(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ds = Dataset.from_dict({"text": ["Once upon a time there was a little dog named Max. He liked to run."] * 8})
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=2, report_to=[],
                         use_cpu=True, learning_rate=1e-3, max_length=64, save_strategy="no", disable_tqdm=True)
    trl.SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok).train()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert changed and all(k.endswith(".codebook") for k in changed)


def test_adapter_really_applied_in_generate_and_eval_tasks(capsys, sketched_dir, lm_data, tmp_path):
    """CLI --adapter output equals the in-memory tuned model's and differs from the base's."""
    from sketchtune.cli import main
    from sketchtune.eval.generate import generate
    from sketchtune.eval.tasks import BUNDLED_TASKS, evaluate_tasks

    model, tok = sketchtune.load(sketched_dir, dtype=torch.float32)
    base, _ = sketchtune.load(sketched_dir, dtype=torch.float32)
    train_sketch(model, tok, lm_data, tmp_path / "run", **{**TRAIN_ARGS, "max_steps": 2, "learning_rate": 5e-2,
                                                          "save_steps": 10})
    model.eval()
    prompt = "Once upon a time"
    tuned_text = generate(model, tok, prompt, max_new_tokens=12)
    assert tuned_text != generate(base, tok, prompt, max_new_tokens=12)
    capsys.readouterr()
    assert main(["generate", str(sketched_dir), "--adapter", str(tmp_path / "run"), "--prompt", prompt,
                 "--max-new-tokens", "12", "--device", "cpu"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == prompt + tuned_text

    kw = dict(limit=4, batch_size=4, mode="likelihood", progress=False)
    tuned = evaluate_tasks(model, tok, ["boolq"], BUNDLED_TASKS, **kw)["tasks"]["boolq"]["predictions"]
    plain = evaluate_tasks(base, tok, ["boolq"], BUNDLED_TASKS, **kw)["tasks"]["boolq"]["predictions"]
    out = tmp_path / "eval.json"
    assert main(["eval-tasks", str(sketched_dir), "--adapter", str(tmp_path / "run"), "--tasks", "boolq",
                 "--data-dir", "bundled", "--limit", "4", "--batch-size", "4", "--mode", "likelihood",
                 "--out", str(out), "--device", "cpu"]) == 0
    got = json.loads(out.read_text())["tasks"]["boolq"]["predictions"]
    # The CLI runs the fp16 checkpoint in fp16 ("auto"), the in-memory model in fp32: equal to fp16 rounding,
    # while the adapter moves the scores by far more than that.
    to_tuned = max(abs(g["scores"][l] - t["scores"][l]) for g, t in zip(got, tuned) for l in g["scores"])
    to_base = max(abs(g["scores"][l] - p["scores"][l]) for g, p in zip(got, plain) for l in g["scores"])
    assert to_tuned < 0.02 and to_base > 10 * to_tuned, (to_tuned, to_base)


def test_resume_skips_checkpoint_killed_mid_save(tmp_path):
    from sketchtune.train.trainer import latest_complete_checkpoint

    root = tmp_path / "run" / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False), (10, False)):
        (root / f"checkpoint-{step}").mkdir(parents=True)
        if complete:
            (root / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
    (root / "checkpoint-x").mkdir()
    assert latest_complete_checkpoint(tmp_path / "run") == str(root / "checkpoint-4")
    assert latest_complete_checkpoint(tmp_path / "none") is None


def test_every_adapter_error(sketched_dir, tmp_path):
    """The adapter refusals, each triggered once; a refused adapter leaves the model untouched."""
    from safetensors.torch import load_file, save_file

    model, tok = sketchtune.load(sketched_dir, dtype=torch.float32)
    save_adapter(model, tmp_path / "good")
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def variant(name, edit):
        d = tmp_path / name
        d.mkdir()
        tensors = load_file(tmp_path / "good" / "sketch_adapter.safetensors")
        edit(tensors)
        save_file(tensors, d / "sketch_adapter.safetensors")
        (d / "sketch_adapter.json").write_text((tmp_path / "good" / "sketch_adapter.json").read_text())
        return d

    key = "model.layers.1.mlp.down_proj.codebook"
    missing = variant("missing", lambda t: t.pop(key))
    shape = variant("shape", lambda t: t.__setitem__(key, t[key][:, :, :8].contiguous()))
    nan = variant("nan", lambda t: t[key].__setitem__((0, 0, 0), float("nan")))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "sketch_adapter.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    (corrupt / "sketch_adapter.json").write_text((tmp_path / "good" / "sketch_adapter.json").read_text())
    badmeta = variant("badmeta", lambda t: None)
    (badmeta / "sketch_adapter.json").write_text("{")
    for path, pattern in [(tmp_path / "nothing", "no sketch adapter at"), (missing, "lacks codebooks for 1 modules"),
                          (shape, "has shape"), (nan, "NaN or Inf"), (corrupt, "corrupt sketch adapter"),
                          (badmeta, "is not valid JSON")]:
        with pytest.raises(SketchError, match=pattern):
            load_adapter(model, path)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on CPU, tested on Linux")
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_processes_match_one_and_write_one_adapter(sharding, sketched_dir, tmp_path):
    """torchrun --nproc_per_node 2 (gloo, CPU), data parallel or with codebooks sharded by FSDP2: the same loss
    curve as one process with the same global batch, and one adapter, written by rank 0."""
    import shutil

    from sketchtune.train.adapter import load_adapter

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    common = ["train", str(sketched_dir), "--data", "tinystories", "--max-steps", "3", "--cutoff-len", "32",
              "--logging-steps", "1", "--learning-rate", "1e-2", "--save-steps", "100", "--threads", "1"]
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "sketchtune", *common, "--out",
                          str(tmp_path / "ddp"), "--per-device-train-batch-size", "2",
                          *(["--fsdp"] if sharding == "fsdp" else [])],
                         capture_output=True, text=True, timeout=600, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("sketch adapter:") == 1  # rank 0 only
    one = subprocess.run([sys.executable, "-m", "sketchtune", *common, "--out", str(tmp_path / "one"),
                          "--per-device-train-batch-size", "4"], capture_output=True, text=True, timeout=600,
                         env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    curves = [[h["loss"] for h in json.loads((tmp_path / r / "train_results.json").read_text())["log_history"]
               if "loss" in h] for r in ("ddp", "one")]
    assert len(curves[0]) == len(curves[1]) == 3
    # Gradients are all-reduced in another order than one process sums them: equal to float rounding.
    assert curves[0] == pytest.approx(curves[1], rel=1e-3)
    assert (tmp_path / "ddp" / "sketch_adapter.safetensors").is_file()
    # The adapter holds whole codebooks (gathered from both ranks' shards under FSDP) and loads over the base.
    model, _ = sketchtune.load(sketched_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("codebook")}
    load_adapter(model, tmp_path / "ddp")
    after = {n: p.detach() for n, p in model.named_parameters() if n.endswith("codebook")}
    assert all(after[n].shape == before[n].shape for n in before)
    assert all(not torch.equal(after[n], before[n]) for n in before)


def test_fsdp_refusals(capsys, monkeypatch, sketched_dir, tmp_path):
    from sketchtune.cli import main

    common = ["train", str(sketched_dir), "--data", "tinystories", "--max-steps", "1", "--cutoff-len", "32",
              "--out", str(tmp_path / "run")]
    assert main([*common, "--fsdp"]) == 2  # no torchrun: refused before loading anything
    err = capsys.readouterr().err
    assert "launch with torchrun" in err and err.count("\n") == 1, err
    for extra, message in ((["--save-full"], "--save-full with --fsdp"), (["--resume"], "--resume with --fsdp")):
        monkeypatch.setenv("WORLD_SIZE", "2")  # as under torchrun; refused before the process group is needed
        assert main([*common, "--fsdp", *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "run" / "sketch_adapter.safetensors").exists()
