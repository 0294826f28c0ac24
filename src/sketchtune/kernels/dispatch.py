"""``sketched_linear``: the one entry point a layer calls, choosing between the kernels and the reference.

Rule (``SKETCHTUNE_KERNELS``, read on every call so tests and users can flip it at run time):

* ``auto`` (default): CUDA inputs → ``sketchtune::linear`` on the Triton kernels when triton imports. CPU
  inputs (fp32/bf16) with the native extension built → ``sketchtune::linear`` on the C++ kernels, for
  inference and training alike: decoding straight from the packed codes (1.7× the dense fp32 model's
  tokens/s in ``benchmarks/results/efficiency_cpu.json``), prefill and the backward Ŵ-tile by Ŵ-tile, so
  an eval-mode model holds only its codes and codebooks and training saves nothing per weight. Otherwise
  (no compiler, fp16 or fp64 activations) the pure-PyTorch reference — ``dequantize`` + ``F.linear``, whose
  autograd is the ground-truth gradient — with the layer's dense-Ŵ cache in inference;
* ``cache``: on CPU, inference through the dense-Ŵ cache (:mod:`.dense_cache`): a dense Ŵ per layer next
  to the codes, the dense model's speed (the default before the C++ kernels; opt-in now); training as
  ``auto``;
* ``native``: as ``auto`` on CPU (kept for scripts written when it was opt-in);
* ``reference``: always the reference, never a cache or a kernel — the ground truth, bit for bit;
* ``triton``: always ``sketchtune::linear``, with the Triton kernels wherever they run (on CPU under
  ``TRITON_INTERPRET=1``) — for testing the op and its autograd anywhere.
"""

from __future__ import annotations

import os
from typing import Literal

import torch
import torch.nn.functional as F

from .. import layout
from . import cpu_kernels
from .dense_cache import DenseWeightCache
from .ops import linear, linear_forward, triton_available

BACKEND_ENV = "SKETCHTUNE_KERNELS"
Backend = Literal["triton", "native", "reference"]


_CHOICES = ("auto", "triton", "reference", "native", "cache")


def _choice() -> str:
    choice = os.environ.get(BACKEND_ENV, "auto")
    if choice not in _CHOICES:
        choice = choice.lower()
        if choice not in _CHOICES:
            raise ValueError(f"{BACKEND_ENV} must be 'auto', 'cache', 'native', 'reference' or 'triton', "
                             f"got {choice!r}")
    return choice


def _backend(x: torch.Tensor, choice: str, training: bool = False) -> Backend:
    if choice in ("reference", "triton"):
        return choice  # type: ignore[return-value]
    if x.is_cuda:
        return "triton" if triton_available() else "reference"
    if x.is_cpu and (choice in ("auto", "native") or training) and cpu_kernels.native(x):
        return "native"
    return "reference"


def _needs_op(x: torch.Tensor, codebook: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether the call must go through the ``sketchtune::linear`` custom op — for autograd (a gradient is
    wanted) or for a compiler (opaque to Dynamo) — rather than its body, which skips the op's dispatch cost."""
    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and (x.requires_grad or codebook.requires_grad
                                        or (bias is not None and bias.requires_grad))


def backend_for(x: torch.Tensor, training: bool = False) -> Backend:
    """Which implementation ``sketched_linear`` uses for input ``x`` (with a codebook gradient wanted if
    ``training``) under the current environment."""
    return _backend(x, _choice(), training)


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
    training = codebook.requires_grad and torch.is_grad_enabled()
    backend = _backend(x, choice, training)
    if backend != "reference":
        # The op: Triton on CUDA; on CPU the C++ kernels — decoding from the packed codes, prefill and the
        # backward tile by tile, saving only x, the codes and the codebook for the backward where the
        # reference autograd keeps Ŵ and an int64 index per weight for every layer (~12 B a weight).
        if cache is not None:
            cache.clear()
        if not _needs_op(x, codebook, bias):
            return linear_forward(x, packed, codebook, bias, bits, in_features)
        return linear(x, packed, codebook, bias, bits, in_features)
    b = bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)
    if cache is not None and choice in ("auto", "cache") and x.is_cpu and not torch.compiler.is_compiling():
        if training:
            # A codebook gradient is on its way, so an optimizer step may follow — a fused one leaves
            # ``_version`` alone — hence the cache goes now and the gather below gives the exact gradient.
            cache.clear()
        elif (w := cache.get(packed, codebook, bits, in_features, x.dtype)) is not None:
            return F.linear(x, w, b)
    return F.linear(x, layout.dequantize(packed, codebook, bits, in_features).to(x.dtype), b)
