"""Healing: train a sketched model's codebooks, codes frozen, to match its full-precision teacher's outputs.

Sketching is layer by layer: every layer minimises its own output error and the errors compound through the
depth. The codebooks are trainable, so a short global step — the model's next-token distribution pulled
towards the teacher's on generic calibration text — recovers part of what the layer-wise step lost (the role
of AQLM's PV-tuning and EfficientQAT's end-to-end stage). The format does not change and inference costs
nothing more; every later task fine-tune starts from the better base.

Loss: token-level KL divergence between teacher and student next-token distributions at temperature ``T``
(scaled by T², the usual distillation normalisation), averaged over the non-padding tokens. ``forward`` is
KL(teacher ‖ student) — the student must cover what the teacher predicts (mass-covering); ``reverse`` is
KL(student ‖ teacher) (mode-seeking). The teacher's logits are computed on the fly, one forward per step
under ``no_grad``: cached logits would take vocab × tokens × 2 bytes (6.4 GB for 128 × 512 tokens at
SmolLM2's 49k vocabulary), and top-k caches change the objective. The teacher costs one more forward per
step, about a third of a training step.

Training is ``train_sketch`` (Trainer, fp32 master codebooks, resumable checkpoints, progress bar) with the
loss swapped, so every training flag works the same way.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from datasets import Dataset
from torch.utils.checkpoint import checkpoint
from transformers import Trainer

from ..errors import SketchError

Direction = Literal["forward", "reverse"]


def _kl_sum(teacher_logits: torch.Tensor, student_logits: torch.Tensor, weight: torch.Tensor | None,
            temperature: float, direction: Direction) -> torch.Tensor:
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p, q = (t, s) if direction == "forward" else (s, t)
    per_token = (p.exp() * (p - q)).sum(dim=-1)
    return per_token.sum() if weight is None else (per_token * weight).sum()


#: Tokens per KL chunk: the fp32 temporaries (log-softmaxes, probabilities) are chunk × vocab each, recomputed
#: in the backward rather than kept — at SmolLM2's 49k vocabulary 4 × 512 tokens at once would hold ~6 of
#: them, 2.4 GB, where chunks of 256 hold 50 MB each.
KL_CHUNK_TOKENS = 256


def token_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor | None = None,
             temperature: float = 1.0, direction: Direction = "forward") -> torch.Tensor:
    """Mean over (unmasked) tokens of KL between the two next-token distributions, × T²; fp32 throughout.

    Computed :data:`KL_CHUNK_TOKENS` tokens at a time, each chunk checkpointed when a gradient is wanted, so
    memory beyond the two logit tensors is a chunk's, not the batch's.
    """
    if direction not in ("forward", "reverse"):
        raise SketchError(f"direction must be 'forward' or 'reverse', got {direction!r}")
    vocab = student_logits.shape[-1]
    t_flat, s_flat = teacher_logits.reshape(-1, vocab), student_logits.reshape(-1, vocab)
    w_flat = None if mask is None else mask.reshape(-1).to(torch.float32)
    grad = torch.is_grad_enabled() and student_logits.requires_grad
    total = student_logits.new_zeros((), dtype=torch.float32)
    for i in range(0, s_flat.shape[0], KL_CHUNK_TOKENS):
        args = (t_flat[i : i + KL_CHUNK_TOKENS], s_flat[i : i + KL_CHUNK_TOKENS],
                None if w_flat is None else w_flat[i : i + KL_CHUNK_TOKENS], temperature, direction)
        total = total + (checkpoint(_kl_sum, *args, use_reentrant=False) if grad else _kl_sum(*args))
    count = s_flat.shape[0] if w_flat is None else w_flat.sum().clamp_min(1)
    return total / count * temperature**2


class DistillationTrainer(Trainer):
    """``Trainer`` whose loss is :func:`token_kl` against a frozen teacher run on the same batch."""

    def __init__(self, *args, teacher: torch.nn.Module, temperature: float = 1.0,
                 direction: Direction = "forward", **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.temperature, self.direction = temperature, direction

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        outputs = model(input_ids=ids, attention_mask=mask)
        with torch.no_grad():
            teacher_logits = self.teacher(input_ids=ids.to(self.teacher.device),
                                          attention_mask=None if mask is None else mask.to(self.teacher.device)
                                          ).logits.to(outputs.logits.device)
        loss = token_kl(teacher_logits, outputs.logits, mask, self.temperature, self.direction)
        return (loss, outputs) if return_outputs else loss


def window_dataset(tokens: torch.Tensor) -> Dataset:
    """Calibration windows (n, seqlen) as a dataset of equal-length examples (no padding needed)."""
    return Dataset.from_dict({"input_ids": tokens.tolist()})


def window_collator(features: list[dict]) -> dict[str, torch.Tensor]:
    """Equal-length windows stacked; every token is real, so the attention mask is all ones."""
    ids = torch.tensor([f["input_ids"] for f in features])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.no_grad()
def mean_kl(student: torch.nn.Module, teacher: torch.nn.Module, tokens: torch.Tensor, batch_size: int = 8,
            temperature: float = 1.0, direction: Direction = "forward") -> float:
    """:func:`token_kl` averaged over windows (n, seqlen): the healing objective measured on any text."""
    total, n = 0.0, 0
    for chunk in tokens.split(batch_size):
        s, t = student(input_ids=chunk).logits, teacher(input_ids=chunk.to(teacher.device)).logits
        total += float(token_kl(t.to(s.device), s, None, temperature, direction)) * chunk.numel()
        n += chunk.numel()
    return total / max(n, 1)


def check_teacher(student: torch.nn.Module, teacher: torch.nn.Module) -> None:
    """The teacher must speak the student's vocabulary, or the KL compares unrelated distributions."""
    sv = student.get_output_embeddings().weight.shape[0]
    tv = teacher.get_output_embeddings().weight.shape[0]
    if sv != tv:
        raise SketchError(f"teacher's vocabulary ({tv} tokens) differs from the sketched model's ({sv}): "
                          "heal with the model the sketch was made from")
