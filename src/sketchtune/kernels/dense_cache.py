"""CPU inference, opt-in (``SKETCHTUNE_KERNELS=cache``): keep a layer's dequantized Ŵ between calls.

The default CPU path is the C++ kernels (:mod:`.cpu_kernels`), which decode straight from the packed codes
faster than the dense model and hold no dense weight. The cache remains for CPUs where they cannot be built
or do not win, and for fp16/fp64 activations they do not take (where ``auto`` uses it too): the cached Ŵ
*is* the dense GEMV plus a few µs of checks, at the price of a dense Ŵ per layer next to its codes. The
measured trade-off is in README "Kernels" and ``benchmarks/results/efficiency_cpu.json``.

Correctness rules, enforced by :func:`sketchtune.kernels.sketched_linear` and here:

* never while the codebook needs a gradient (grad mode and ``requires_grad``) — training always goes
  through the gather, whose autograd is the exact codebook gradient — and such a forward *drops* the cache
  (``SketchedLinear`` in ``train()`` mode drops it too). Every optimizer step follows such a forward, so
  even a *fused* AdamW step, which leaves ``_version`` unchanged (measured with torch 2.13), can never be
  served a stale Ŵ;
* rebuilt when the codes or the codebook move to other storage (``.data =``, ``.to()``, ``.float()``; the
  cache pins the storages it was built from, so a new tensor cannot reuse their address) or their
  ``_version`` moves (``load_state_dict``, ``copy_``, foreach/for-loop optimizer steps, any in-place
  op), or another dtype is asked for;
* not checked: contents. ``torch.equal`` on the codebook would catch edits through ``.data`` too, but it
  costs 60–240 µs per call here (single-threaded, 24K–131K values) — as much as the GEMV it serves. After
  editing codes or codebooks through ``.data``, call :meth:`DenseWeightCache.clear`;
* not used for inference tensors (no version counter) or while ``torch.compile`` traces.
"""

from __future__ import annotations

import torch

from .. import layout


class DenseWeightCache:
    """The dense Ŵ of one layer, valid for one (codes, codebook, dtype) state."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._weight: torch.Tensor | None = None
        self._pinned: tuple[torch.Tensor, ...] = ()

    def get(
        self, packed: torch.Tensor, codebook: torch.Tensor, bits: int, in_features: int, dtype: torch.dtype
    ) -> torch.Tensor | None:
        """Ŵ (out, in) in ``dtype``, rebuilt only if the codes, the codebook or the dtype changed.

        ``None`` for inference tensors: they have no version counter, so nothing could tell us they changed.
        """
        try:
            key = (packed.data_ptr(), packed._version, codebook.data_ptr(), codebook._version, dtype)
        except RuntimeError:
            return None
        if self._key != key:
            # A normal (not inference) tensor, so the cache stays usable when inference mode is left.
            with torch.inference_mode(False), torch.no_grad():
                self._weight = layout.dequantize(packed, codebook, bits, in_features).to(dtype)
                # Holding the source storages keeps their addresses from being reused by a replacement
                # tensor (say after .half().float()), which could otherwise arrive with the same _version.
                self._pinned = (packed.detach(), codebook.detach())
            self._key = key
        return self._weight

    def clear(self) -> None:
        """Drop the cached Ŵ (training does, so its memory is not held for nothing)."""
        self._key = self._weight = None
        self._pinned = ()

    @property
    def weight(self) -> torch.Tensor | None:
        """The cached Ŵ, if any."""
        return self._weight
