"""``SketchedEmbedding``: a token embedding table stored in the sketch format (packed codes + codebooks).

In a small model the vocabulary table is a large share of the weights (SmolLM2-135M: 28 M of 135 M
parameters, 21%), so a sketch that leaves it dense cannot be much smaller than a quarter of the dense model
in memory. A lookup decodes only the rows asked for — ``codebook[row, group, code]`` for each of the
``hidden`` columns of each token — so it never rebuilds the table. When the model ties its LM head to the
embedding, the head is a :class:`SketchedLinear` holding the *same* two parameters (tied the way transformers
ties ``lm_head.weight``), so the table is stored and held once and the logits run on the sketch kernels.

Models that scale the looked-up rows inside the embedding module (Gemma's ``embed_scale``) keep that scale.
"""

from __future__ import annotations

import torch
from torch import nn

from .layout import check_layout, dequantize_codes, pack_codes, packed_row_bytes, unpack_codes


class SketchedEmbedding(nn.Module):
    """Drop-in replacement for ``nn.Embedding`` whose table is ``codebook[codes]``; the codebooks stay frozen
    in fine-tuning (the trainer trains the decoder layers' codebooks only, as with a dense embedding)."""

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        bits: int,
        gpr: int,
        padding_idx: int | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_layout(bits, gpr, embedding_dim)
        self.num_embeddings, self.embedding_dim, self.bits, self.gpr = num_embeddings, embedding_dim, bits, gpr
        self.padding_idx = padding_idx
        self.codebook = nn.Parameter(torch.zeros(num_embeddings, gpr, 2**bits, dtype=dtype, device=device),
                                     requires_grad=False)
        self.weight = nn.Parameter(
            torch.zeros(num_embeddings, packed_row_bytes(embedding_dim, bits), dtype=torch.uint8, device=device),
            requires_grad=False,
        )
        self.row_scale: float | None = None  # see keep_scale_of

    @classmethod
    def from_codes(cls, codebook: torch.Tensor, codes: torch.Tensor, bits: int, padding_idx: int | None = None,
                   dtype: torch.dtype | None = None) -> "SketchedEmbedding":
        """Build from a sketching result: codebook (vocab, gpr, 2^bits) and codes (vocab, hidden)."""
        vocab, gpr, _ = codebook.shape
        table = cls(vocab, codes.shape[1], bits, gpr, padding_idx, dtype=dtype or codebook.dtype,
                    device=codebook.device)
        with torch.no_grad():
            table.codebook.copy_(codebook.to(table.codebook.dtype))
            table.weight.copy_(pack_codes(codes, bits))
        return table

    def keep_scale_of(self, dense: nn.Module) -> None:
        """Carry over a scale the dense module applied to every looked-up row (Gemma's ``embed_scale``)."""
        scale = getattr(dense, "scalar_embed_scale", None)
        buffer = getattr(dense, "embed_scale", None)
        if scale is None and isinstance(buffer, torch.Tensor) and not buffer.is_meta:
            scale = buffer.item()
        # A float, not a buffer: loading builds modules on the meta device, and a non-persistent buffer made there
        # would come back uninitialised (transformers re-initialises only its own modules' buffers).
        self.row_scale = None if scale is None else float(scale)

    def dequantize(self) -> torch.Tensor:
        """The whole table (vocab, hidden) — for analysis and tests; lookups never build it."""
        return dequantize_codes(self.codebook, unpack_codes(self.weight, self.bits, self.embedding_dim))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = input_ids.reshape(-1)
        codes = unpack_codes(self.weight.index_select(0, rows), self.bits, self.embedding_dim)
        out = dequantize_codes(self.codebook.index_select(0, rows), codes).view(*input_ids.shape, self.embedding_dim)
        if self.row_scale is not None:
            out = out * torch.tensor(self.row_scale, dtype=out.dtype)  # as Gemma does: scale rounded to the dtype
        return out

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, gpr={self.gpr}"
