"""``sketched_linear``: the one entry point a layer calls, choosing between the kernels and the reference.

Rule (``SKETCHTUNE_KERNELS``, read on every call so tests and users can flip it at run time):

* ``auto`` (default): ``sketchtune::linear`` (Triton) for CUDA inputs when triton imports; on CPU, when a
  codebook gradient is wanted and the native extension is built, ``sketchtune::linear`` with its C++ tiled bodies
  (training memory: nothing per weight is saved for the backward); otherwise the pure-PyTorch reference —
  ``dequantize`` + ``F.linear``, whose autograd is the ground-truth gradient — with, on CPU when no codebook
  gradient is wanted, the layer's dense-Ŵ cache (see :mod:`.dense_cache`);
* ``reference``: always the reference, never the cache — the ground truth, bit for bit;
* ``native``: on CPU, ``sketchtune::linear`` on the C++ kernels for everything — decoding straight from the
  packed codes, prefill tile by tile — and no dense-Ŵ cache is kept, so an eval-mode model holds only its
  codes and codebooks. Opt-in while the GEMV is slower than the dense cache on small layers (README
  "Kernels");
* ``triton``: always ``sketchtune::linear`` (on CPU it runs its kernels under ``TRITON_INTERPRET=1`` and
  its PyTorch bodies otherwise) — for testing the op and its autograd anywhere. It is also a lever for CPU
  training memory: the op recomputes Ŵ in backward where the reference autograd keeps Ŵ and int64 gather
  indices per layer (~12 B per weight); README "Kernels" has the measured trade-off.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn.functional as F

from .. import layout
from . import cpu_kernels
from .dense_cache import DenseWeightCache
from .ops import linear, triton_available

BACKEND_ENV = "SKETCHTUNE_KERNELS"
Backend = Literal["triton", "reference"]


_CHOICES = ("auto", "triton", "reference", "native")


def _choice() -> str:
    choice = os.environ.get(BACKEND_ENV, "auto")
    if choice not in _CHOICES:
        choice = choice.lower()
        if choice not in _CHOICES:
            raise ValueError(f"{BACKEND_ENV} must be 'auto', 'triton', 'reference' or 'native', got {choice!r}")
    return choice


def _backend(x: torch.Tensor, choice: str) -> Backend:
    if choice == "auto" or (choice == "native" and x.is_cuda):
        return "triton" if x.is_cuda and triton_available() else "reference"
    if choice == "native":
        return "reference"  # the reference path, with the native GEMV for decoding (see sketched_linear)
    return choice  # type: ignore[return-value]


def backend_for(x: torch.Tensor) -> Backend:
    """Which implementation ``sketched_linear`` uses for input ``x`` under the current environment."""
    return _backend(x, _choice())


def sketched_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    codebook: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    in_features: int,
    cache: DenseWeightCache | None = None,
) -> torch.Tensor:
    """y = x Ŵᵀ + b with Ŵ = codebook[row, group(col), code]; differentiable in x, codebook and bias.

    ``cache`` is the layer's :class:`DenseWeightCache`; pass it only in inference (eval) mode.
    """
    choice = _choice()
    if _backend(x, choice) == "triton":
        return linear(x, packed, codebook, bias, bits, in_features)
    training = codebook.requires_grad and torch.is_grad_enabled()
    if x.is_cpu and (choice == "native" or (choice == "auto" and training)) and cpu_kernels.native(x):
        # The op on the C++ kernels: decoding from the packed codes, prefill and the backward tile by tile.
        # Training saves only x, the codes and the codebook, where the reference autograd would keep Ŵ and an
        # int64 index per weight for every layer until the backward (~12 B a weight).
        if cache is not None:
            cache.clear()
        return linear(x, packed, codebook, bias, bits, in_features)
    b = bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)
    if cache is not None and choice == "auto" and x.is_cpu and not torch.compiler.is_compiling():
        if training:
            # A codebook gradient is on its way, so an optimizer step may follow — a fused one leaves
            # ``_version`` alone — hence the cache goes now and the gather below gives the exact gradient.
            cache.clear()
        elif (w := cache.get(packed, codebook, bits, in_features, x.dtype)) is not None:
            return F.linear(x, w, b)
    return F.linear(x, layout.dequantize(packed, codebook, bits, in_features).to(x.dtype), b)
