"""Triton kernels for packed-code layers and the Python launchers that size their grids.

Every kernel decodes the dense packing of :mod:`sketchtune.layout` in registers: code ``c`` of a row sits
at bit ``c·bits`` of the row's little-endian byte stream, so it is one byte shifted (2/4-bit codes never
straddle bytes) or, for 3-bit codes, two bytes when the shift exceeds 5. The codebook of a code is
``codebook[row, c // group_size]`` — a handful of values per row that stay in L1/L2, so a lookup is a
gather from cache, never a dense Ŵ in DRAM (except in :func:`dequantize`, whose job is to build it).

Three jobs, one kernel each (plus the fallback of the second):

* ``dequantize``: Ŵ for the prefill/training matmul;
* ``codebook_grad``: ∂L/∂codebook = bins of dYᵀX, the dYᵀX tile computed with ``tl.dot`` in fp32 and reduced
  straight into per-(row, group, code) fp32 bins with atomics — ∂L/∂Ŵ never reaches memory.
  ``bin_reduce`` is the two-step fallback: bins of a dL/dŴ that a 2-D matmul already wrote;
* ``lut_gemv``: decode matvec for 1–8 tokens, fp32 accumulation, split-K so small layers fill the GPU.

This module imports triton, so it is imported lazily (:mod:`.ops` does it on first use). Kernels are built
when the module is imported: with ``TRITON_INTERPRET=1`` set by then they run on CPU tensors under
Triton's interpreter (:data:`INTERPRETED`), which is how the tests check them without a GPU.

Block sizes are conservative defaults, untuned: this was written on a machine without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

try:  # the interpreter's function type; the module path has been stable since triton 3.0
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:  # pragma: no cover
    InterpretedFunction = ()  # type: ignore[assignment,misc]


@triton.jit
def _load_codes(packed_ptr, rows, cols, row_bytes, mask, BITS: tl.constexpr):
    """Integer codes at (rows, cols) (broadcastable int tensors) of a packed (out, row_bytes) uint8 matrix."""
    bit = cols * BITS
    shift = bit % 8
    addr = packed_ptr + rows.to(tl.int64) * row_bytes + bit // 8
    word = tl.load(addr, mask=mask, other=0).to(tl.int32)
    if BITS == 3:  # a 3-bit code starting past bit 5 of its byte spills into the next one
        word = word | (tl.load(addr + 1, mask=mask & (shift > 5), other=0).to(tl.int32) << 8)
    return (word >> shift) & ((1 << BITS) - 1)


@triton.jit
def _dequantize_kernel(
    packed_ptr, codebook_ptr, out_ptr, n_rows, n_cols, row_bytes, group_size, gpr,
    BITS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    code = _load_codes(packed_ptr, rows, cols, row_bytes, mask, BITS)
    entry = rows.to(tl.int64) * (gpr << BITS) + (cols // group_size) * (1 << BITS) + code
    value = tl.load(codebook_ptr + entry, mask=mask, other=0.0)
    tl.store(out_ptr + rows.to(tl.int64) * n_cols + cols, value.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _lut_gemv_kernel(
    x_ptr, packed_ptr, codebook_ptr, partial_ptr, n_tokens, n_rows, n_cols, row_bytes, group_size, gpr,
    BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    """partial[split, m, o] = Σ_{c in this split} x[m, c] · codebook[o, group(c), code[o, c]] in fp32."""
    pid_o, pid_k = tl.program_id(0), tl.program_id(1)
    rows = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    row_ok = rows < n_rows
    tokens = tl.arange(0, BLOCK_M)
    token_ok = tokens < n_tokens
    codebook_row = codebook_ptr + rows.to(tl.int64)[:, None] * (gpr << BITS)
    acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
    for start in range(pid_k * BLOCK_K, n_cols, SPLIT_K * BLOCK_K):
        cols = start + tl.arange(0, BLOCK_K)
        col_ok = cols < n_cols
        w_mask = row_ok[:, None] & col_ok[None, :]
        code = _load_codes(packed_ptr, rows[:, None], cols[None, :], row_bytes, w_mask, BITS)
        w = tl.load(codebook_row + (cols // group_size)[None, :] * (1 << BITS) + code, mask=w_mask, other=0.0)
        x = tl.load(x_ptr + tokens[:, None] * n_cols + cols[None, :],
                    mask=token_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
    out = partial_ptr + pid_k * n_tokens * n_rows + tokens[:, None] * n_rows + rows[None, :]
    tl.store(out, acc, mask=token_ok[:, None] & row_ok[None, :])


@triton.jit
def _accumulate_bins(
    grad_ptr, tile, packed_ptr, rows, cols, col_start, col_end, n_rows, n_cols, row_bytes, group_size, gpr,
    BITS: tl.constexpr,
):
    """Add every value of an fp32 (rows × cols) tile of ∂L/∂Ŵ to its (row, group, code) bin."""
    row_ok = rows < n_rows
    valid = row_ok[:, None] & (cols < n_cols)[None, :]
    code = _load_codes(packed_ptr, rows[:, None], cols[None, :], row_bytes, valid, BITS)
    group = cols // group_size
    bin_row = grad_ptr + rows.to(tl.int64) * (gpr << BITS)
    # A tile spans one group on real widths (group sizes are multiples of the block), several on odd ones.
    for g in range(col_start // group_size, (col_end - 1) // group_size + 1):
        in_group = valid & (group == g)[None, :]
        for k in tl.static_range(1 << BITS):
            total = tl.sum(tl.where(in_group & (code == k), tile, 0.0), axis=1)
            tl.atomic_add(bin_row + g * (1 << BITS) + k, total, mask=row_ok, sem="relaxed")


@triton.jit
def _codebook_grad_kernel(
    dy_ptr, x_ptr, packed_ptr, grad_ptr, n_tokens, n_rows, n_cols, row_bytes, group_size, gpr,
    BITS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """Fused: one (BLOCK_O × BLOCK_C) tile of dYᵀX in fp32 registers, reduced into codebook bins in place."""
    col_start = tl.program_id(1) * BLOCK_C
    rows = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    cols = col_start + tl.arange(0, BLOCK_C)
    acc = tl.zeros((BLOCK_O, BLOCK_C), dtype=tl.float32)
    for start in range(0, n_tokens, BLOCK_N):
        tokens = start + tl.arange(0, BLOCK_N)
        token_ok = tokens < n_tokens
        dy_t = tl.load(dy_ptr + tokens.to(tl.int64)[None, :] * n_rows + rows[:, None],
                       mask=(rows < n_rows)[:, None] & token_ok[None, :], other=0.0)
        x = tl.load(x_ptr + tokens.to(tl.int64)[:, None] * n_cols + cols[None, :],
                    mask=token_ok[:, None] & (cols < n_cols)[None, :], other=0.0)
        if UPCAST:  # the interpreter multiplies bf16 bit patterns in tl.dot (triton-lang/triton#11584)
            dy_t, x = dy_t.to(tl.float32), x.to(tl.float32)
        acc = tl.dot(dy_t, x, acc, input_precision=PRECISION)
    col_end = tl.minimum(col_start + BLOCK_C, n_cols)
    _accumulate_bins(grad_ptr, acc, packed_ptr, rows, cols, col_start, col_end, n_rows, n_cols, row_bytes,
                     group_size, gpr, BITS)


@triton.jit
def _bin_reduce_kernel(
    dw_ptr, packed_ptr, grad_ptr, n_rows, n_cols, row_bytes, group_size, gpr,
    BITS: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
):
    col_start = tl.program_id(1) * BLOCK_C
    rows = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    cols = col_start + tl.arange(0, BLOCK_C)
    mask = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    tile = tl.load(dw_ptr + rows.to(tl.int64)[:, None] * n_cols + cols[None, :], mask=mask, other=0.0)
    col_end = tl.minimum(col_start + BLOCK_C, n_cols)
    _accumulate_bins(grad_ptr, tile.to(tl.float32), packed_ptr, rows, cols, col_start, col_end, n_rows, n_cols,
                     row_bytes, group_size, gpr, BITS)


INTERPRETED: bool = isinstance(_dequantize_kernel, InterpretedFunction)
"""True when the kernels were built under ``TRITON_INTERPRET=1`` and so run on CPU tensors."""


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 products follow PyTorch's own TF32 switch, so a kernel is never less exact than ``torch.mm``."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


def dequantize(packed: torch.Tensor, codebook: torch.Tensor, bits: int, in_features: int,
               dtype: torch.dtype) -> torch.Tensor:
    """Ŵ (out, in) in ``dtype``."""
    out, gpr, _ = codebook.shape
    packed, codebook = packed.contiguous(), codebook.contiguous()
    w = torch.empty(out, in_features, dtype=dtype, device=packed.device)
    block_r, block_c = 32, 128
    grid = (triton.cdiv(out, block_r), triton.cdiv(in_features, block_c))
    _dequantize_kernel[grid](packed, codebook, w, out, in_features, packed.shape[1], in_features // gpr, gpr,
                             BITS=bits, BLOCK_R=block_r, BLOCK_C=block_c)
    return w


def _gemv_blocks(n_tokens: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_O, BLOCK_K): keep the fp32 (M × O × K) product at 8K values per program."""
    block_m = max(1, triton.next_power_of_2(n_tokens))
    block_k = 128 if block_m <= 4 else 64
    return block_m, max(16, 8192 // (block_m * block_k)), block_k


def lut_gemv(x: torch.Tensor, packed: torch.Tensor, codebook: torch.Tensor, bits: int, in_features: int,
             split_k: int | None = None) -> torch.Tensor:
    """y = x Ŵᵀ for a few tokens, x (M ≤ 8, in) → (M, out) in x's dtype, without materialising Ŵ."""
    out, gpr, _ = codebook.shape
    n_tokens = x.shape[0]
    x, packed, codebook = x.contiguous(), packed.contiguous(), codebook.contiguous()
    block_m, block_o, block_k = _gemv_blocks(n_tokens)
    row_blocks, k_blocks = triton.cdiv(out, block_o), triton.cdiv(in_features, block_k)
    if split_k is None:  # enough programs for ~2 waves over the SMs; the interpreter wants as few as possible
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 1
        split_k = triton.cdiv(2 * sms, row_blocks)
    split_k = max(1, min(split_k, k_blocks))
    partial = torch.empty(split_k, n_tokens, out, dtype=torch.float32, device=x.device)
    _lut_gemv_kernel[(row_blocks, split_k)](
        x, packed, codebook, partial, n_tokens, out, in_features, packed.shape[1], in_features // gpr, gpr,
        BITS=bits, BLOCK_M=block_m, BLOCK_O=block_o, BLOCK_K=block_k, SPLIT_K=split_k)
    return partial.sum(0).to(x.dtype)  # summing the splits here keeps the result deterministic


def codebook_grad(grad_out: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, bits: int,
                  gpr: int) -> torch.Tensor:
    """fp32 (out, gpr, 2^bits) bins of dYᵀX; grad_out (N, out) and x (N, in) share a dtype."""
    n_tokens, out = grad_out.shape
    in_features = x.shape[1]
    grad_out, x, packed = grad_out.contiguous(), x.contiguous(), packed.contiguous()
    grad = torch.zeros(out, gpr, 1 << bits, dtype=torch.float32, device=x.device)
    block_o, block_c, block_n = 64, 64, 32
    grid = (triton.cdiv(out, block_o), triton.cdiv(in_features, block_c))
    _codebook_grad_kernel[grid](
        grad_out, x, packed, grad, n_tokens, out, in_features, packed.shape[1], in_features // gpr, gpr,
        BITS=bits, BLOCK_O=block_o, BLOCK_C=block_c, BLOCK_N=block_n,
        UPCAST=INTERPRETED and x.dtype == torch.bfloat16, PRECISION=_dot_precision(x.dtype))
    return grad


def bin_reduce(grad_weight: torch.Tensor, packed: torch.Tensor, bits: int, gpr: int) -> torch.Tensor:
    """fp32 (out, gpr, 2^bits) bins of a dense ∂L/∂Ŵ (out, in)."""
    out, in_features = grad_weight.shape
    grad_weight, packed = grad_weight.contiguous(), packed.contiguous()
    grad = torch.zeros(out, gpr, 1 << bits, dtype=torch.float32, device=grad_weight.device)
    block_o, block_c = 32, 128
    grid = (triton.cdiv(out, block_o), triton.cdiv(in_features, block_c))
    _bin_reduce_kernel[grid](grad_weight, packed, grad, out, in_features, packed.shape[1], in_features // gpr, gpr,
                             BITS=bits, BLOCK_O=block_o, BLOCK_C=block_c)
    return grad
