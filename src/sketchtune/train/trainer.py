"""Codebook-only fine-tuning on Hugging Face ``Trainer``.

Everything a trainer should do — gradient accumulation, warmup and linear/cosine schedules, clipping, bf16/fp16
autocast, logging, accelerate multi-GPU, checkpointing and resuming — comes from ``transformers.Trainer``;
this module only decides *what* trains:

* only ``SketchedLinear.codebook`` has ``requires_grad`` (codes, embeddings, norms, LM head stay frozen);
* codebooks are held in fp32 even when the rest of the model runs in bf16/fp16, so the optimizer state and
  master weights are fp32 and updates far below bf16 resolution (≈ 0.4% of a weight) are not rounded away, as
  they are when bf16 parameters are trained directly. ``SketchedLinear`` casts Ŵ to the activation dtype, so
  the matmul still runs at the low precision.

Resuming picks the newest checkpoint that was *completely* written (``trainer_state.json`` is saved last), so
a run killed with SIGKILL mid-save continues from the previous one without losing finished steps.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from .._io import write_json_atomic
from ..checkpoint import save
from ..errors import SketchError
from .adapter import (
    checkpoint_codes_fingerprint,
    codes_fingerprint,
    save_adapter,
    sketched_modules,
)
from .distributed import full_codebooks, keep_sharded_model, shard_codebooks

CHECKPOINTS = "checkpoints"


def prepare_for_training(model: torch.nn.Module) -> int:
    """Freeze all but the codebooks, keep those in fp32; returns the number of trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    n = 0
    for m in sketched_modules(model).values():
        m.codebook.data = m.codebook.data.float()
        m.codebook.requires_grad_(True)
        n += m.codebook.numel()
    return n


def _checkpoint_step(path: Path) -> int | None:
    tail = path.name[len("checkpoint-"):]
    return int(tail) if path.name.startswith("checkpoint-") and tail.isdigit() else None


def run_checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Every ``checkpoint-N`` directory under ``out_dir/checkpoints``, complete or not, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    found = [p for p in root.glob("checkpoint-*") if p.is_dir() and _checkpoint_step(p) is not None]
    return sorted(found, key=_checkpoint_step)


def latest_complete_checkpoint(out_dir: str | os.PathLike) -> str | None:
    """Newest ``checkpoint-N`` under ``out_dir/checkpoints`` whose trainer state was written."""
    done = [p for p in run_checkpoints(out_dir) if (p / "trainer_state.json").is_file()]
    return str(done[-1]) if done else None


def resume_checkpoint(out_dir: str | os.PathLike, model: torch.nn.Module) -> str:
    """The checkpoint ``--resume`` continues from, after checking that it was made from ``model``'s codes.

    Trainer restores the whole state dict of a checkpoint, packed codes included, so resuming against another
    sketched base would silently train that base's codes; we refuse it instead, before any work.
    """
    ckpt = latest_complete_checkpoint(out_dir)
    if ckpt is None:
        partial = run_checkpoints(out_dir)
        what = f" ({len(partial)} incomplete, killed while saving)" if partial else ""
        raise SketchError(f"--resume: no complete checkpoint to resume from under {Path(out_dir) / CHECKPOINTS}{what}")
    names = list(sketched_modules(model))
    if checkpoint_codes_fingerprint(ckpt, names) != codes_fingerprint(model):
        raise SketchError(f"--resume: {ckpt} was made from a different sketched base than this model "
                          "(codes fingerprint differs); resume with the base the run started from")
    return ckpt


def prepare_run_dir(out_dir: str | os.PathLike, overwrite: bool = False) -> None:
    """A fresh run must not share a directory with an old run's checkpoints (a later --resume would pick them).

    With ``overwrite`` the old ``checkpoint-N`` directories (which a run wrote) are removed; nothing else is.
    """
    old = run_checkpoints(out_dir)
    if not old:
        return
    if not overwrite:
        raise SketchError(f"{out_dir} already holds a training run ({old[-1].name}); pass --resume to continue it "
                          "or --overwrite to start over")
    for p in old:
        shutil.rmtree(p)


def build_trainer(
    model, tokenizer, train_dataset, eval_dataset=None, out_dir: str | os.PathLike = "sketchtune-run",
    callbacks: list | None = None, fsdp: bool = False, trainer_class: type[Trainer] = Trainer,
    trainer_kwargs: dict | None = None, collator=None, **training_args: Any,
) -> Trainer:
    """A ``Trainer`` for codebook fine-tuning; ``training_args`` are ``TrainingArguments`` fields.

    ``fsdp=True`` (under ``torchrun``) shards the codebooks across processes (:mod:`.distributed`).
    ``trainer_class`` / ``trainer_kwargs`` / ``collator`` swap the objective (healing's distillation loss).
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    defaults: dict[str, Any] = dict(
        output_dir=str(Path(out_dir) / CHECKPOINTS), learning_rate=8e-5, lr_scheduler_type="linear",
        per_device_train_batch_size=4, logging_steps=10, save_strategy="steps", save_steps=100,
        save_total_limit=2, report_to=[], remove_unused_columns=False, disable_tqdm=False,
        eval_strategy="steps" if eval_dataset is not None else "no",
    )
    defaults.update({k: v for k, v in training_args.items() if v is not None})
    if fsdp:
        # Trainer saves checkpoints from rank 0 alone, which cannot gather sharded codebooks; an FSDP run writes
        # its adapter at the end (all ranks gather) and no intermediate checkpoints.
        defaults["save_strategy"] = "no"
    if eval_dataset is not None and training_args.get("eval_steps") is None:
        defaults["eval_steps"] = defaults["save_steps"]
    try:
        args = TrainingArguments(**defaults)
    except ValueError as e:  # TrainingArguments' own validation (precision flags, schedules, step counts)
        raise SketchError(f"invalid training arguments: {str(e).strip().splitlines()[0]}") from None
    if fsdp:
        if args.world_size < 2:  # reading it starts torchrun's process group, which fully_shard needs
            raise SketchError("--fsdp shards codebooks across processes: launch with torchrun --nproc_per_node N "
                              "(N ≥ 2)")
        shard_codebooks(model)
    collator = collator or DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100,
                                                  pad_to_multiple_of=8)
    trainer = trainer_class(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                            data_collator=collator, processing_class=tokenizer, callbacks=callbacks,
                            **(trainer_kwargs or {}))
    if fsdp:
        keep_sharded_model(trainer.accelerator)
    for stock, ours in ((ProgressCallback, NumericProgressCallback), (PrinterCallback, NumericPrinterCallback)):
        if trainer.pop_callback(stock) is not None:
            trainer.add_callback(ours)
    return trainer


def format_logs(logs: dict) -> str:
    """One log line with numbers as numbers (``loss 2.3412``), not the quoted strings Trainer prints."""
    parts = []
    for k, v in logs.items():
        if k == "total_flos":
            continue
        if isinstance(v, float):
            v = f"{v:.4g}" if (abs(v) < 1e-3 or abs(v) >= 1e5) and v != 0 else f"{v:.4f}".rstrip("0").rstrip(".")
        parts.append(f"{k} {v}")
    return "  ".join(parts)


class NumericProgressCallback(ProgressCallback):
    """Trainer's progress bar, with log lines written by :func:`format_logs`."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and self.training_bar is not None and logs:
            self.training_bar.write(format_logs(logs))


class NumericPrinterCallback(PrinterCallback):
    """Trainer's plain printer (``disable_tqdm``), with log lines written by :func:`format_logs`."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_local_process_zero and logs:
            print(format_logs(logs))


def check_fsdp_request(resume: bool | str = False, save_full: bool = False) -> None:
    """Refuse what an FSDP run cannot do, before anything is loaded."""
    if int(os.environ.get("WORLD_SIZE", "1")) < 2:
        raise SketchError("--fsdp shards codebooks across processes: launch with torchrun --nproc_per_node N (N ≥ 2)")
    if resume:
        raise SketchError("--resume with --fsdp is not supported: FSDP runs write no intermediate checkpoints")
    if save_full:
        raise SketchError("--save-full with --fsdp is not supported: load the run's adapter over the base instead "
                          "(generate/eval --adapter), or train in one process")


def train_sketch(
    model, tokenizer, train_dataset, out_dir: str | os.PathLike, eval_dataset=None, resume: bool | str = False,
    save_full: bool = False, callbacks: list | None = None, overwrite: bool = False, fsdp: bool = False,
    trainer_class: type[Trainer] = Trainer, trainer_kwargs: dict | None = None, collator=None,
    **training_args: Any,
) -> dict:
    """Fine-tune a sketched model's codebooks; writes the sketch adapter (and optionally the full model).

    ``resume=True`` continues from the newest complete checkpoint (checked against ``model``'s codes, see
    :func:`resume_checkpoint`); a path resumes from that checkpoint. A fresh run refuses a directory holding
    another run's checkpoints unless ``overwrite``. Returns the metrics also written to
    ``out_dir/train_results.json``; ``loss_curve.png`` beside it plots them.
    """
    out = Path(out_dir)
    if fsdp:
        check_fsdp_request(resume=resume, save_full=save_full)
    trainable = prepare_for_training(model)
    if resume:
        ckpt = resume if isinstance(resume, str) else resume_checkpoint(out, model)
    else:
        ckpt = None
        prepare_run_dir(out, overwrite)
    trainer = build_trainer(model, tokenizer, train_dataset, eval_dataset, out, callbacks, fsdp=fsdp,
                            trainer_class=trainer_class, trainer_kwargs=trainer_kwargs, collator=collator,
                            **training_args)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=ckpt)
    seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = {
        "trainable_params": trainable, "train_loss": result.training_loss, "global_step": result.global_step,
        "seconds": seconds, "resumed_from": ckpt,
        "examples_per_step": trainer.args.per_device_train_batch_size * trainer.args.gradient_accumulation_steps
        * trainer.args.world_size,
        "seconds_per_step": seconds / max(1, result.global_step - (_checkpoint_step(Path(ckpt)) if ckpt else 0)),
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "log_history": trainer.state.log_history,
    }
    if eval_dataset is not None:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    metrics["main_process"] = trainer.is_world_process_zero()
    books = full_codebooks(model) if fsdp else None  # all ranks gather their shards, in step
    if not metrics["main_process"]:  # under torchrun only rank 0 writes the adapter and the results
        return metrics
    save_adapter(model, out, codebooks=books)
    if save_full:
        save(model, tokenizer, out / "full", overwrite=True)  # out/full is this run's own output
    write_json_atomic(out / "train_results.json", metrics)
    plot_loss_curve(metrics["log_history"], out / "loss_curve.png")
    return metrics


def plot_loss_curve(log_history: list[dict], path: Path) -> Path | None:
    """Training (and eval) loss against step, as a PNG; ``None`` when nothing was logged or no matplotlib."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h]
    if not train and not evals:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for points, label in ((train, "train loss"), (evals, "eval loss")):
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 50 else None, label=label)
    ax.set(xlabel="step", ylabel="loss", title="codebook fine-tuning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
