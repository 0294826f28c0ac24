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

import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

from ..errors import SketchError
from .adapter import save_adapter, sketched_modules

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


def latest_complete_checkpoint(out_dir: str | os.PathLike) -> str | None:
    """Newest ``checkpoint-N`` under ``out_dir/checkpoints`` whose trainer state was written."""
    root = Path(out_dir) / CHECKPOINTS
    done = [p for p in root.glob("checkpoint-*") if (p / "trainer_state.json").is_file() and p.name[11:].isdigit()]
    return str(max(done, key=lambda p: int(p.name[11:]))) if done else None


def build_trainer(
    model, tokenizer, train_dataset, eval_dataset=None, out_dir: str | os.PathLike = "sketchtune-run",
    callbacks: list | None = None, **training_args: Any,
) -> Trainer:
    """A ``Trainer`` for codebook fine-tuning; ``training_args`` are ``TrainingArguments`` fields."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    defaults: dict[str, Any] = dict(
        output_dir=str(Path(out_dir) / CHECKPOINTS), learning_rate=8e-5, lr_scheduler_type="linear",
        per_device_train_batch_size=4, logging_steps=10, save_strategy="steps", save_steps=100,
        save_total_limit=2, report_to=[], remove_unused_columns=False, disable_tqdm=False,
        eval_strategy="steps" if eval_dataset is not None else "no",
    )
    defaults.update({k: v for k, v in training_args.items() if v is not None})
    if eval_dataset is not None and training_args.get("eval_steps") is None:
        defaults["eval_steps"] = defaults["save_steps"]
    args = TrainingArguments(**defaults)
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100, pad_to_multiple_of=8)
    return Trainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                   data_collator=collator, processing_class=tokenizer, callbacks=callbacks)


def train_sketch(
    model, tokenizer, train_dataset, out_dir: str | os.PathLike, eval_dataset=None, resume: bool = False,
    save_full: bool = False, callbacks: list | None = None, **training_args: Any,
) -> dict:
    """Fine-tune a sketched model's codebooks; writes the sketch adapter (and optionally the full model).

    Returns the metrics also written to ``out_dir/train_results.json``.
    """
    out = Path(out_dir)
    trainable = prepare_for_training(model)
    trainer = build_trainer(model, tokenizer, train_dataset, eval_dataset, out, callbacks, **training_args)
    ckpt = latest_complete_checkpoint(out) if resume else None
    if resume and ckpt is None and any((out / CHECKPOINTS).glob("checkpoint-*")):
        raise SketchError(f"--resume: no complete checkpoint under {out / CHECKPOINTS}")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=ckpt)
    seconds = time.perf_counter() - t0
    metrics: dict[str, Any] = {
        "trainable_params": trainable, "train_loss": result.training_loss, "global_step": result.global_step,
        "seconds": seconds, "resumed_from": ckpt,
        "seconds_per_step": seconds / max(1, result.global_step - (int(Path(ckpt).name[11:]) if ckpt else 0)),
        "peak_cuda_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
        "log_history": trainer.state.log_history,
    }
    if eval_dataset is not None:
        metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    save_adapter(model, out)
    if save_full:
        from ..checkpoint import save

        save(model, tokenizer, out / "full")
    (out / "train_results.json").write_text(json.dumps(metrics, indent=2, default=str) + "\n")
    return metrics
