"""``SketchedLinear``: a linear layer stored as packed codes + trainable codebooks.

The forward pass rebuilds Ŵ = codebook[codes] and runs one ``F.linear`` — no adapter branch. Because the
rebuild is a ``gather`` (:func:`sketchtune.layout.dequantize`), autograd's backward is exactly the scatter-add
of ∂L/∂Ŵ into the codebook that the paper's gradient kernel computes, so that path is the reference. ``forward`` goes through
:func:`sketchtune.kernels.sketched_linear`, which runs the Triton kernels on CUDA and this reference on CPU
(with a dense-Ŵ cache in eval mode, so CPU decoding is as fast as the dense layer).

The packed codes live in a frozen uint8 parameter named ``weight`` (bitsandbytes does the same for 4-bit
weights). That is deliberate: a checkpoint loaded *without* sketchtune then fails with a shape mismatch on
``*.weight`` instead of silently initialising random weights.
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels import DenseWeightCache, sketched_linear
from .layout import check_layout, dequantize, pack_codes, packed_row_bytes, unpack_codes


class SketchedLinear(nn.Module):
    """Drop-in replacement for ``nn.Linear`` whose only trainable weights are the codebooks."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        gpr: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_layout(bits, gpr, in_features)
        self.in_features, self.out_features, self.bits, self.gpr = in_features, out_features, bits, gpr
        self.codebook = nn.Parameter(torch.zeros(out_features, gpr, 2**bits, dtype=dtype, device=device))
        self.weight = nn.Parameter(
            torch.zeros(out_features, packed_row_bytes(in_features, bits), dtype=torch.uint8, device=device),
            requires_grad=False,
        )
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self.dense_cache = DenseWeightCache()  # CPU eval only; not state, never saved

    @classmethod
    def from_codes(
        cls,
        codebook: torch.Tensor,
        codes: torch.Tensor,
        bits: int,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> "SketchedLinear":
        """Build from a sketching result: codebook (out, gpr, 2^bits) and codes (out, in)."""
        out, gpr, _ = codebook.shape
        dtype = dtype or codebook.dtype
        layer = cls(codes.shape[1], out, bits, gpr, bias is not None, dtype=dtype, device=codebook.device)
        with torch.no_grad():
            layer.codebook.copy_(codebook.to(dtype))
            layer.weight.copy_(pack_codes(codes, bits))
            if bias is not None:
                layer.bias.copy_(bias.to(dtype))
        return layer

    @property
    def codes(self) -> torch.Tensor:
        """Unpacked integer codes (out, in)."""
        return unpack_codes(self.weight, self.bits, self.in_features)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.weight, self.codebook, self.bits, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.dense_cache.clear()
        cache = None if self.training else self.dense_cache
        return sketched_linear(x, self.weight, self.codebook, self.bias, self.bits, self.in_features, cache)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"gpr={self.gpr}, bias={self.bias is not None}"
        )
