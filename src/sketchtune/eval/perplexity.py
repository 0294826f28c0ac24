"""Perplexity with the protocol quantization papers use (GPTQ, SketchTune Table 6).

The corpus is joined into one string, tokenized once without special tokens, cut into non-overlapping windows
of ``seqlen`` tokens (the tail shorter than a window is dropped), and perplexity is exp of the mean
next-token NLL over every predicted token of every window.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..errors import SketchError
from ..text import read_text


@dataclass
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int
    windows: int
    seqlen: int


def token_windows(tokenizer, source: str | os.PathLike, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """(windows, seqlen) token ids of a corpus."""
    ids = tokenizer(read_text(source), return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = ids.numel() // seqlen
    if n == 0:
        raise SketchError(f"{source}: {ids.numel()} tokens is fewer than one window of seqlen={seqlen}")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)


@torch.no_grad()
def perplexity(
    model,
    tokenizer,
    source: str | os.PathLike,
    seqlen: int = 2048,
    max_windows: int | None = None,
    batch_size: int = 4,
    progress: bool = True,
) -> PerplexityResult:
    """Perplexity of ``model`` on a text file (or bundled name: ``wikitext2``, ``c4``, ``tinystories``).

    ``seqlen`` is capped at the model's context (``max_position_embeddings``); the result says what was used.
    """
    context = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    seqlen = min(seqlen, context) if context else seqlen
    windows = token_windows(tokenizer, source, seqlen, max_windows)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for batch in tqdm(windows.split(batch_size), desc=f"ppl {os.path.basename(str(source))}", disable=not progress):
        batch = batch.to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_tokens += batch[:, 1:].numel()
    mean = total_nll / total_tokens
    return PerplexityResult(ppl=math.exp(mean), nll=mean, tokens=total_tokens, windows=windows.shape[0], seqlen=seqlen)
