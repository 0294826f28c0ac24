"""The ``sketchtune::*`` custom operators: the Triton kernels as ops that autograd and torch.compile can see.

=================================  ==========================================================================
``sketchtune::linear``             y = x Ŵᵀ + b, with autograd (∂x, ∂codebook, ∂bias; none for the codes);
                                   CUDA/reference: ≤ ``GEMV_MAX_TOKENS`` tokens → ``lut_gemv``, more →
                                   ``dequantize`` + matmul; CPU native: the GEMV, the batched bf16 kernel or
                                   the tiles by token count (:data:`CPU_GEMV_MAX_TOKENS`). Inference calls
                                   its body, :func:`linear_forward`, without the op's dispatch
``sketchtune::dequantize``         Ŵ (out, in) in a given dtype
``sketchtune::lut_gemv``           x (M, in) → (M, out) straight from the packed codes, fp32 accumulation;
                                   on CPU the native AVX-512/AVX2 kernel (:mod:`.cpu_kernels`) when built
``sketchtune::grad_input``         ∂x = ∂y Ŵ (the backward's other half), in ∂y's dtype
``sketchtune::codebook_grad``      fp32 (out, gpr, 2^bits) bins of dYᵀX, fused (no ∂L/∂Ŵ in memory)
``sketchtune::bin_reduce``         fp32 bins of a dense ∂L/∂Ŵ — the two-step fallback of ``codebook_grad``
``sketchtune::experts``            a routed mixture-of-experts block (gate/up, SiLU·up, down per expert),
                                   inference only: what a serving engine calls with its own routing
=================================  ==========================================================================

They are ``torch.library.custom_op`` s with ``register_fake`` rather than ``triton_op`` s: opaque to the
compiler (the kernels are already fused, there is nothing left for Inductor to fuse into them), and each op
is usable on every device — Triton on CUDA (or on CPU under ``TRITON_INTERPRET=1``), otherwise a pure
PyTorch body computing the same thing, so a CPU ``opcheck`` or an export never hits a missing kernel.

The backward of ``linear`` recomputes Ŵ for ∂x instead of saving it: one dequantize per layer is cheap next
to the matmul, and saving Ŵ would cost a dense weight of activation memory per layer. On CPU with the native
extension (:mod:`.cpu_kernels`) every op but the GEMV (and the batched bf16 forward) runs ``cpu/tiles.cpp``:
prefill, ∂x and ∂codebook walk
Ŵ in ~4 MiB row tiles, so not even one whole-layer Ŵ, dense ∂Ŵ or int64 index tensor exists. ∂codebook uses the
fused kernel unless ``SKETCHTUNE_CODEBOOK_GRAD=unfused`` selects 2-D ``torch.mm`` + ``bin_reduce`` (kept as
the fallback; which is faster per shape is still to be measured on a GPU). ``SKETCHTUNE_CODEBOOK_GRAD=bf16``
is the fused kernel with dYᵀX computed from dY and x rounded to bf16 (fp32 accumulation, binned in fp32): the
arithmetic bf16 autocast gives a weight gradient, and on AVX512-BF16 CPUs that product — the one GEMM a
codebook step computes and a LoRA step does not — runs ~4× faster than in fp32. Bins are added with fp32
atomics, so ∂codebook is not bitwise deterministic on GPU.
"""

from __future__ import annotations

import importlib.util
import os
from functools import cache
from types import ModuleType

import torch

from .. import layout
from . import cpu_kernels

GEMV_MAX_TOKENS = 8
"""Token counts up to this use the LUT GEMV (decoding); more rebuild Ŵ for one matmul (prefill, training)."""

CPU_GEMV_MAX_TOKENS = cpu_kernels.MAX_TOKENS
"""On CPU with the native kernels, fp32 inputs of up to this many tokens go through the LUT GEMV (which walks
them in blocks of 4: at 8 tokens on one thread, bits 2/3/4 × GPR 1/4 × fp32/bf16 on 576↔1536 and 2048², two
blocks of 4 ran 1.2–2.6× faster than one of 8 in 30 of 36 cases, as 8 tokens' accumulators spill), and bf16
inputs of up to 4, or 3 with AMX (:func:`.cpu_kernels.gemv_tokens`: beyond that the AMX or the batched bf16
kernel is faster where the CPU has it); more go through those kernels or Ŵ tile by tile into torch's GEMM. The
choice is made in C++ (:func:`.cpu_kernels.linear_any`, one call per layer)."""

CODEBOOK_GRAD_ENV = "SKETCHTUNE_CODEBOOK_GRAD"
_CPU_DTYPES = (torch.float32, torch.bfloat16)


@cache
def triton_available() -> bool:
    """Whether triton is installed and imports (it is an optional dependency: ``pip install sketchtune[kernels]``)."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        _kernels()
    except Exception:  # a broken or mismatched install must not take the reference path down with it
        return False
    return True


def _kernels() -> ModuleType:
    from . import triton_kernels

    return triton_kernels


def triton_runs_on(t: torch.Tensor) -> bool:
    """Whether the Triton kernels run on ``t``'s device: CUDA; on CPU under Triton's interpreter (a testing
    aid), unless the native C++ kernels take ``t`` and ``SKETCHTUNE_KERNELS=triton`` does not ask for Triton."""
    if not triton_available():
        return False
    if t.is_cuda:
        return True
    return t.device.type == "cpu" and _kernels().INTERPRETED and (
        os.environ.get("SKETCHTUNE_KERNELS", "").lower() == "triton" or not cpu_kernels.native(t))


# --- dequantize -------------------------------------------------------------------------------------------


@torch.library.custom_op("sketchtune::dequantize", mutates_args=())
def dequantize(
    packed: torch.Tensor, codebook: torch.Tensor, bits: int, in_features: int, dtype: torch.dtype
) -> torch.Tensor:
    if triton_runs_on(packed):
        return _kernels().dequantize(packed, codebook, bits, in_features, dtype)
    if cpu_kernels.native(packed):
        return cpu_kernels.dequantize(packed, codebook, bits, in_features).to(dtype)
    return layout.dequantize(packed, codebook, bits, in_features).to(dtype)


@dequantize.register_fake
def _(packed, codebook, bits, in_features, dtype):
    return packed.new_empty(packed.shape[0], in_features, dtype=dtype)


# --- LUT GEMV ---------------------------------------------------------------------------------------------


@torch.library.custom_op("sketchtune::lut_gemv", mutates_args=())
def lut_gemv(
    x: torch.Tensor, packed: torch.Tensor, codebook: torch.Tensor, bits: int, in_features: int
) -> torch.Tensor:
    return _lut_gemv(x, packed, codebook, bits, in_features)


def _lut_gemv(x: torch.Tensor, packed: torch.Tensor, codebook: torch.Tensor, bits: int,
              in_features: int) -> torch.Tensor:
    if x.shape[0] == 0:
        return x.new_empty(0, packed.shape[0])
    if triton_runs_on(x):
        return _kernels().lut_gemv(x, packed, codebook, bits, in_features)
    if cpu_kernels.handles(x):
        return cpu_kernels.lut_gemv(x, packed, codebook, bits, in_features)
    w = layout.dequantize(packed, codebook, bits, in_features)
    return (x.float() @ w.float().t()).to(x.dtype)


@lut_gemv.register_fake
def _(x, packed, codebook, bits, in_features):
    return x.new_empty(x.shape[0], packed.shape[0])


# --- input gradient ---------------------------------------------------------------------------------------


@torch.library.custom_op("sketchtune::grad_input", mutates_args=())
def grad_input(
    grad_out: torch.Tensor, packed: torch.Tensor, codebook: torch.Tensor, bits: int, in_features: int
) -> torch.Tensor:
    if triton_runs_on(grad_out):
        return grad_out @ _kernels().dequantize(packed, codebook, bits, in_features, grad_out.dtype)
    if cpu_kernels.native(grad_out):
        gx = cpu_kernels.linear_backward(grad_out, None, packed, codebook, bits, in_features, codebook.shape[1],
                                         need_codebook=False)[0]
        return gx.to(grad_out.dtype)
    return (grad_out.float() @ layout.dequantize(packed, codebook, bits, in_features).float()).to(grad_out.dtype)


@grad_input.register_fake
def _(grad_out, packed, codebook, bits, in_features):
    return grad_out.new_empty(grad_out.shape[0], in_features)


# --- codebook gradient ------------------------------------------------------------------------------------


@torch.library.custom_op("sketchtune::codebook_grad", mutates_args=())
def codebook_grad(
    grad_out: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, bits: int, gpr: int, bf16_product: bool = False
) -> torch.Tensor:
    if triton_runs_on(x):
        if bf16_product:
            grad_out, x = grad_out.bfloat16(), x.bfloat16()
        return _kernels().codebook_grad(grad_out, x, packed, bits, gpr)
    if cpu_kernels.native(x):
        return cpu_kernels.linear_backward(grad_out, x, packed, None, bits, x.shape[1], gpr, need_x=False,
                                           bf16_product=bf16_product)[1]
    if bf16_product:
        return layout.bin_reduce((grad_out.bfloat16().t() @ x.bfloat16()).float(), packed, bits, gpr)
    return layout.bin_reduce(grad_out.float().t() @ x.float(), packed, bits, gpr)


@codebook_grad.register_fake
def _(grad_out, x, packed, bits, gpr, bf16_product=False):
    return x.new_empty(packed.shape[0], gpr, 1 << bits, dtype=torch.float32)


@torch.library.custom_op("sketchtune::bin_reduce", mutates_args=())
def bin_reduce(grad_weight: torch.Tensor, packed: torch.Tensor, bits: int, gpr: int) -> torch.Tensor:
    if triton_runs_on(grad_weight):
        return _kernels().bin_reduce(grad_weight, packed, bits, gpr)
    if cpu_kernels.native(grad_weight):
        return cpu_kernels.bin_reduce(grad_weight, packed, bits, gpr)
    return layout.bin_reduce(grad_weight, packed, bits, gpr)


@bin_reduce.register_fake
def _(grad_weight, packed, bits, gpr):
    return grad_weight.new_empty(packed.shape[0], gpr, 1 << bits, dtype=torch.float32)


def _codebook_grad(grad_out: torch.Tensor, x: torch.Tensor, packed: torch.Tensor, bits: int,
                   gpr: int) -> torch.Tensor:
    """fp32 ∂L/∂codebook via the fused kernel (dYᵀX in bf16 if the env var says ``bf16``), or the 2-D product +
    bin reduction if it says ``unfused``."""
    mode = os.environ.get(CODEBOOK_GRAD_ENV, "fused").lower()
    if mode in ("fused", "bf16"):
        return codebook_grad(grad_out, x, packed, bits, gpr, mode == "bf16")
    if mode == "unfused":
        return bin_reduce(grad_out.t() @ x, packed, bits, gpr)  # one 2-D (out, in) product, never batched
    raise ValueError(f"{CODEBOOK_GRAD_ENV} must be 'fused', 'unfused' or 'bf16', got {mode!r}")


# --- the layer --------------------------------------------------------------------------------------------


@torch.library.custom_op("sketchtune::linear", mutates_args=())
def linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    codebook: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    in_features: int,
) -> torch.Tensor:
    return linear_forward(x, packed, codebook, bias, bits, in_features)


def linear_forward(x: torch.Tensor, packed: torch.Tensor, codebook: torch.Tensor, bias: torch.Tensor | None,
                   bits: int, in_features: int) -> torch.Tensor:
    """The body of ``sketchtune::linear`` as a plain function: what inference calls when no gradient is wanted
    and nothing is being compiled. Each custom-op dispatch costs ~20–50 µs in eager mode — next to a 50 µs
    decode GEMV of a 576×1536 layer, that doubled the layer's time — so this skips both (``linear`` and the
    ``lut_gemv`` it used to call)."""
    if x.dtype in _CPU_DTYPES and cpu_kernels.native(x) and not triton_runs_on(x):
        return cpu_kernels.linear_any(x, packed, codebook, bias, bits, in_features)
    x2d = x.reshape(-1, in_features)
    if x2d.shape[0] <= GEMV_MAX_TOKENS:
        y = _lut_gemv(x2d, packed, codebook, bits, in_features)
    else:
        y = x2d @ dequantize(packed, codebook, bits, in_features, x.dtype).t()
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], packed.shape[0])


@linear.register_fake
def _(x, packed, codebook, bias, bits, in_features):
    return x.new_empty(*x.shape[:-1], packed.shape[0])


def _setup_context(ctx, inputs, output) -> None:
    x, packed, codebook, bias, bits, in_features = inputs
    ctx.bits, ctx.in_features, ctx.bias_dtype = bits, in_features, None if bias is None else bias.dtype
    ctx.save_for_backward(x, packed, codebook)


def _backward(ctx, grad_out: torch.Tensor):
    x, packed, codebook = ctx.saved_tensors
    bits, in_features = ctx.bits, ctx.in_features
    out, gpr, _ = codebook.shape
    dy = grad_out.reshape(-1, out)
    grad_x = grad_codebook = grad_bias = None
    x2d = x.reshape(-1, in_features)
    if ctx.needs_input_grad[0]:
        grad_x = grad_input(dy, packed, codebook, bits, in_features).reshape(x.shape).to(x.dtype)
    if ctx.needs_input_grad[2]:
        grad_codebook = _codebook_grad(dy.to(x2d.dtype), x2d, packed, bits, gpr).to(codebook.dtype)
    if ctx.bias_dtype is not None and ctx.needs_input_grad[3]:
        grad_bias = dy.float().sum(0).to(ctx.bias_dtype)
    return grad_x, None, grad_codebook, grad_bias, None, None


linear.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("sketchtune::experts", mutates_args=())
def experts(
    x: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    gate_up: torch.Tensor,
    gate_up_codebook: torch.Tensor,
    down: torch.Tensor,
    down_codebook: torch.Tensor,
    bits: int,
) -> torch.Tensor:
    return experts_forward(x, topk_weights, topk_ids, gate_up, gate_up_codebook, down, down_codebook, bits)


def experts_forward(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, gate_up: torch.Tensor,
                    gate_up_codebook: torch.Tensor, down: torch.Tensor, down_codebook: torch.Tensor,
                    bits: int) -> torch.Tensor:
    """Σ_k w_k · down_e(SiLU(gate_e x) · up_e x) over each token's routed experts e = ``topk_ids[t, k]``.

    ``gate_up`` (experts, 2·inter, packed) / ``down`` (experts, hidden, packed) hold every expert's packed codes
    and the codebooks (experts, rows, gpr, 2^bits) theirs; gate rows come first, as in transformers' fused
    ``gate_up_proj`` and vLLM's ``w13``. Tokens are grouped per expert so each expert's matrices run once, with
    the same kernels (:func:`linear_forward`) as every other sketched layer: decode touches only the experts
    its tokens picked, and no expert's Ŵ is kept. The same computation as :class:`sketchtune.experts.SketchedExperts`,
    which routes with transformers' router; this op takes the engine's routing instead.
    """
    hidden, inter, top_k = x.shape[-1], gate_up.shape[1] // 2, topk_ids.shape[-1]
    out = torch.zeros_like(x)
    flat = topk_ids.reshape(-1).long()  # entry i is token i // top_k's choice
    weight = topk_weights.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()
    start = 0
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        pick = order[start:start + n]
        start += n
        rows = pick // top_k
        h = linear_forward(x[rows], gate_up[expert], gate_up_codebook[expert], None, bits, hidden)
        gate, up = h.chunk(2, dim=-1)
        y = linear_forward(torch.nn.functional.silu(gate) * up, down[expert], down_codebook[expert], None, bits,
                           inter)
        out.index_add_(0, rows, (y * weight[pick, None].to(y.dtype)).to(out.dtype))
    return out


@experts.register_fake
def _(x, topk_weights, topk_ids, gate_up, gate_up_codebook, down, down_codebook, bits):
    return torch.empty_like(x)
