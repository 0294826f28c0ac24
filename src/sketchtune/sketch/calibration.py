"""Calibration batches: random token windows from a local corpus (GPTQ's C4 protocol, made reproducible)."""

from __future__ import annotations

import os

import torch

from ..errors import SketchError
from ..text import read_text


def calibration_tokens(
    tokenizer, source: str | os.PathLike, nsamples: int, seqlen: int, seed: int = 0
) -> torch.Tensor:
    """(nsamples, seqlen) token ids: windows at seeded random offsets of the tokenized corpus.

    The corpus is tokenized once as a single stream, so documents shorter than ``seqlen`` are usable and
    the windows cross document boundaries as they do in pre-training.
    """
    if nsamples < 1 or seqlen < 2:
        raise SketchError(f"need nsamples ≥ 1 and seqlen ≥ 2, got {nsamples} × {seqlen}")
    ids = tokenizer(read_text(source), return_tensors="pt", add_special_tokens=False).input_ids[0]
    if ids.numel() < seqlen:
        raise SketchError(f"calibration text has {ids.numel()} tokens, fewer than seqlen={seqlen}")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=gen)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
