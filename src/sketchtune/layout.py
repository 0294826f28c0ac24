"""The sketch format: the one contract between the sketcher, the layer, the kernels, checkpoints and adapters.

A sketched ``out × in`` weight with ``bits`` and ``gpr`` (groups per row) is

* **codes** — one integer in ``[0, 2^bits)`` per weight, stored packed: every run of 8 codes along a row becomes
  ``bits`` bytes (8 × bits bits), little-endian — code j of the run occupies bits ``[j·bits, (j+1)·bits)`` of
  the run's integer. 2-bit codes pack 4 per byte, 4-bit 2 per byte and 3-bit 8 per 3 bytes, with no padding
  bits; a row whose length is not a multiple of 8 is padded with zero codes, dropped again on unpacking;
* **codebooks** — ``(out, gpr, 2^bits)`` values: row r, group g = column // (in / gpr), code c → Ŵ[r, col].

Everything that reads or writes that layout — validation, packing, the column → codebook-slot index, the
reference dequantization and the reference bin reduction of a weight gradient into codebook slots — lives
here and nowhere else. ``FORMAT_VERSION`` is recorded in every checkpoint's ``quantization_config``; a
checkpoint of a version this code does not know is refused instead of being misread.
"""

from __future__ import annotations

import torch

from .errors import SketchError

SUPPORTED_BITS = (2, 3, 4)
FORMAT_VERSION = 1
CODES_PER_RUN = 8


def check_layout(bits: int, gpr: int, in_features: int | None = None) -> None:
    """Raise one clear :class:`SketchError` for a layout no matrix (or not this row length) can hold."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise SketchError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if isinstance(gpr, bool) or not isinstance(gpr, int) or gpr < 1:
        raise SketchError(f"gpr must be a positive integer, got {gpr!r}")
    if in_features is not None and in_features % gpr != 0:
        raise SketchError(f"gpr={gpr} must be a positive divisor of the row length {in_features}")


def check_format_version(version: object) -> None:
    """Refuse checkpoints written in a format this code does not know (a missing version is version 1)."""
    if version is None:
        return
    if version != FORMAT_VERSION:
        raise SketchError(f"checkpoint uses sketch format version {version!r}; this sketchtune reads version "
                          f"{FORMAT_VERSION} — upgrade sketchtune, or re-sketch the model with this one")


# --------------------------------------------------------------------------------------------------- packing


def packed_row_bytes(cols: int, bits: int) -> int:
    """Bytes one packed row of ``cols`` codes takes."""
    return -(-cols // CODES_PER_RUN) * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) integer codes in [0, 2^bits) → (rows, packed_row_bytes) uint8."""
    check_layout(bits, 1)
    rows, cols = codes.shape
    runs = -(-cols // CODES_PER_RUN)
    padded = torch.zeros(rows, runs * CODES_PER_RUN, dtype=torch.int64, device=codes.device)
    padded[:, :cols] = codes.long()
    shifts = torch.arange(CODES_PER_RUN, device=codes.device) * bits
    words = (padded.view(rows, runs, CODES_PER_RUN) << shifts).sum(dim=2)  # (rows, runs), < 2^(8·bits)
    byte_shifts = torch.arange(bits, device=codes.device) * 8
    packed = (words[:, :, None] >> byte_shifts) & 0xFF
    return packed.reshape(rows, runs * bits).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: (rows, packed_row_bytes) uint8 → (rows, cols) int64 codes."""
    rows = packed.shape[0]
    runs = packed.shape[1] // bits
    byte_shifts = torch.arange(bits, device=packed.device) * 8
    words = (packed.view(rows, runs, bits).long() << byte_shifts).sum(dim=2)
    shifts = torch.arange(CODES_PER_RUN, device=packed.device) * bits
    codes = (words[:, :, None] >> shifts) & ((1 << bits) - 1)
    return codes.reshape(rows, runs * CODES_PER_RUN)[:, :cols]


# ------------------------------------------------------------------------------ codebook slots and reference ops


def codebook_slots(codes: torch.Tensor, gpr: int, k: int) -> torch.Tensor:
    """(rows, cols) int64 index of each weight's codebook entry in a row's flattened ``(gpr · k)`` codebooks.

    Column j belongs to group ``j // (cols / gpr)``, so its entry is ``group · k + code``.
    """
    cols = codes.shape[1]
    group = torch.arange(cols, device=codes.device) // (cols // gpr)
    return codes.long() + group * k


def dequantize_codes(codebook: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Ŵ (out, in) from codebooks (out, gpr, k) and *unpacked* integer codes (out, in), in the codebook's dtype."""
    out, gpr, k = codebook.shape
    return codebook.reshape(out, gpr * k).gather(1, codebook_slots(codes, gpr, k))


def dequantize(packed: torch.Tensor, codebook: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Ŵ (out, in) from packed codes and codebooks (out, gpr, 2^bits), in the codebook's dtype.

    The reference every kernel is tested against; as a ``gather`` its autograd is exactly the scatter-add of
    ∂L/∂Ŵ into the codebook (:func:`bin_reduce`).
    """
    return dequantize_codes(codebook, unpack_codes(packed, bits, in_features))


def bin_reduce(grad_weight: torch.Tensor, packed: torch.Tensor, bits: int, gpr: int) -> torch.Tensor:
    """Reference codebook gradient: scatter-add of ∂L/∂Ŵ (out, in) into its (row, group, code) slots, in fp32."""
    out, in_features = grad_weight.shape
    k = 1 << bits
    slots = codebook_slots(unpack_codes(packed, bits, in_features), gpr, k)
    bins = torch.zeros(out, gpr * k, dtype=torch.float32, device=grad_weight.device)
    return bins.scatter_add_(1, slots, grad_weight.float()).view(out, gpr, k)
