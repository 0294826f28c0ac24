"""Dense bit-packing of 2/3/4-bit codes.

Every run of 8 codes along a row becomes ``bits`` bytes (8 × bits bits), little-endian: code j of the run
occupies bits [j·bits, (j+1)·bits) of the run's integer. That holds 2-bit codes at 4 per byte, 4-bit at 2
per byte and 3-bit at 8 per 3 bytes — no padding bits, unlike storing 3-bit codes in nibbles. Rows whose
length is not a multiple of 8 are padded with zero codes, which ``unpack_codes`` drops again.
"""

from __future__ import annotations

import torch

CODES_PER_RUN = 8


def packed_row_bytes(cols: int, bits: int) -> int:
    """Bytes one packed row of ``cols`` codes takes."""
    return -(-cols // CODES_PER_RUN) * bits


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(rows, cols) integer codes in [0, 2^bits) → (rows, packed_row_bytes) uint8."""
    if bits not in (2, 3, 4):
        raise ValueError(f"bits must be 2, 3 or 4, got {bits}")
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
