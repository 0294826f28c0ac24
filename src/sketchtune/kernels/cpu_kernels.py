"""Native CPU kernels (C++, AVX-512 / AVX2 picked at run time), built on first use and cached.

``cpu/lut_gemv.cpp`` computes y = x·Ŵᵀ for up to 16 tokens straight from the packed codes and codebooks,
never materialising Ŵ (see the file's header for how), and ``cpu/bf16_gemv.cpp`` the same for 1–4 bf16 tokens on
AVX512-BF16 dot products (bf16 Ŵ, as the reference computes bf16: half the instructions per weight, so a layer
too big for the caches streams its codes at memory speed); ``cpu/bf16_dot.cpp`` serves bf16 batches of 5–32 tokens
(vLLM decoding several requests, short prompts) on AVX512-BF16 dot products, Ŵ decoded one small row panel at a
time, and ``cpu/amx_linear.cpp`` the same (4–64 tokens) on Intel AMX tiles where the CPU has them;
``cpu/tiles.cpp`` serves prefill and training: the
forward, ∂x and the fused codebook gradient walk the layer in ~4 MiB tiles of Ŵ rows, so no whole-layer Ŵ,
dense ∂Ŵ or int64 index tensor is ever held. It is compiled with ``torch.utils.cpp_extension.load``
the first time it is needed — about half a minute, once per machine and torch version; the build is cached in
torch's extension directory — and used by the ``sketchtune::lut_gemv`` op on CPU. Without a compiler, or on a
CPU with neither AVX2 nor AVX-512, a one-line warning says so and the pure-PyTorch reference path is used.

``SKETCHTUNE_CPU_ISA`` = ``auto`` (default) | ``avx2`` | ``avx512`` forces an instruction set (tests force
AVX2 on AVX-512 machines); ``SKETCHTUNE_CPU_KERNELS=0`` turns the native kernels off.
"""

from __future__ import annotations

import hashlib
import os
import shlex
import shutil
import warnings
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

ISA_ENV = "SKETCHTUNE_CPU_ISA"
ENABLE_ENV = "SKETCHTUNE_CPU_KERNELS"
MAX_TOKENS = 16
BF16_DOT_MAX_TOKENS = 32
AMX_MAX_TOKENS = 64
_ISAS = {"auto": 0, "avx2": 1, "avx512": 2}
_SOURCES = [Path(__file__).parent / "cpu" / name
            for name in ("lut_gemv.cpp", "tiles.cpp", "bf16_dot.cpp", "bf16_gemv.cpp", "amx_linear.cpp",
                         "linear_dispatch.cpp")]
_HEADERS = sorted((Path(__file__).parent / "cpu").glob("*.h"))


@cache
def extension() -> ModuleType | None:
    """The compiled extension, or ``None`` (warned once) where it cannot be built or the CPU lacks AVX2."""
    try:
        if (problem := _cannot_build()) is not None:
            warnings.warn(f"sketchtune: native CPU kernels unavailable ({problem}); using the PyTorch path",
                          stacklevel=2)
            return None
        from torch.utils.cpp_extension import load

        # -fopenmp: at::parallel_for is inlined into the extension and splits work only where the extension itself
        # is compiled with OpenMP (torch's CPU build uses the OpenMP backend); without it every kernel ran on one
        # thread whatever torch.set_num_threads said. It links the libgomp.so.1 torch has already loaded, so the
        # extension shares torch's OpenMP runtime and its thread count.
        # One build per torch installation: two environments (e.g. the project's and a vLLM one) sharing torch's
        # extension directory otherwise rebuilt the same name in turn, each against its own torch headers —
        # minutes of g++ whenever the other one had run last.
        # The headers go into that name too: torch rebuilds when a source's contents change, but it hashes
        # only the .cpp files it is given.
        key = str(Path(torch.__file__).resolve().parent).encode() + b"".join(h.read_bytes() for h in _HEADERS)
        env = hashlib.sha1(key).hexdigest()[:8]
        ext = load(name=f"sketchtune_cpu_v29_{env}", sources=[str(s) for s in _SOURCES],
                   extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no ninja, a header problem: the reference path still works
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__).strip()
        first = first if len(first) <= 160 else first[:159] + "…"  # a failed build's line holds its whole command
        warnings.warn(f"sketchtune: native CPU kernels unavailable ({first}); using the PyTorch path", stacklevel=2)
        return None
    if ext.cpu_isa() == 0:
        warnings.warn("sketchtune: this CPU has neither AVX2 nor AVX-512; using the PyTorch path", stacklevel=2)
        return None
    return ext


def _cannot_build() -> str | None:
    """What stops torch from building the extension here, checked before it tries: a try without a compiler
    prints torch's multi-line compiler banner and then fails on the whole build command."""
    from torch.utils.cpp_extension import get_cxx_compiler, is_ninja_available

    cxx = get_cxx_compiler()
    if not cxx.strip() or shutil.which(shlex.split(cxx)[0]) is None:  # CXX may carry a wrapper: "ccache g++"
        return f"no C++ compiler: {cxx!r} not found; install g++ or set CXX"
    if not is_ninja_available():
        return "ninja not found; pip install ninja"
    return None


def enabled() -> bool:
    return os.environ.get(ENABLE_ENV, "1") not in ("0", "false", "off")


def isa() -> int:
    choice = os.environ.get(ISA_ENV, "auto").lower()
    if choice not in _ISAS:
        raise ValueError(f"{ISA_ENV} must be one of {', '.join(_ISAS)}, got {choice!r}")
    return _ISAS[choice]


def handles(x: torch.Tensor) -> bool:
    """Whether the native GEMV takes this input: CPU, fp32/bf16, ≤ 16 tokens, kernels enabled and built."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.dim() == 2
            and x.shape[0] <= MAX_TOKENS and enabled() and extension() is not None)


def lut_gemv(x: torch.Tensor, packed: torch.Tensor, codebook: torch.Tensor, bits: int,
             in_features: int) -> torch.Tensor:
    """y (tokens, out) in x's dtype; fp32 accumulation. Call only where :func:`handles` is true."""
    return extension().lut_gemv(x, packed, codebook, bits, in_features, isa()).to(x.dtype)


def native(t: torch.Tensor) -> bool:
    """Whether the tiled kernels (any token count, no AVX requirement beyond the build's) take tensor ``t``."""
    return t.device.type == "cpu" and t.dtype in (torch.float32, torch.bfloat16, torch.uint8) and enabled() \
        and extension() is not None


def dequantize(packed: torch.Tensor, codebook: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Ŵ (out, in) fp32."""
    return extension().dequantize(packed, codebook, bits, in_features, isa())


def bf16_dot() -> bool:
    """Whether the batched bf16 kernel (``cpu/bf16_dot.cpp``: AVX512-BF16 dot products, Ŵ decoded one row panel
    at a time) runs here: built, a CPU with AVX512-BF16, and no instruction set forced below AVX-512."""
    ext = extension()
    return ext is not None and isa() in (0, 2) and ext.has_bf16_dot()


def bf16_gemv(in_features: int, gpr: int) -> bool:
    """Whether the bf16 GEMV (``cpu/bf16_gemv.cpp``: 1–4 bf16 tokens straight from the codes on AVX512-BF16
    dot products) takes a layer of this shape here: built, a CPU with AVX512-BF16 and VBMI, no instruction set
    forced below AVX-512, and groups (``in_features / gpr``) of a multiple of 16 columns."""
    ext = extension()
    return ext is not None and isa() in (0, 2) and ext.bf16_gemv_fits(in_features, gpr)


def amx() -> bool:
    """Whether the AMX kernel (``cpu/amx_linear.cpp``: Intel AMX bf16 tiles, Sapphire Rapids and later) runs
    here: built, CPUID reports AMX-TILE and AMX-BF16, Linux granted the tile state, and no instruction set is
    forced (``SKETCHTUNE_CPU_ISA=avx512`` tests the AVX-512 kernels on an AMX machine)."""
    ext = extension()
    return ext is not None and isa() == 0 and ext.has_amx()


def gemv_tokens(dtype: torch.dtype) -> int:
    """Up to how many tokens the GEMV is the fastest kernel for activations of ``dtype``; more go to
    :func:`linear`. Measured on one thread (Zen 4; 576↔1536, 2048², 4096²; INT4 GPR 4): with bf16 inputs the
    batched bf16 kernel matches the GEMV at 4 tokens and beats it from 8 on (0.80–1.17× the dense bf16
    ``F.linear``'s time at 8 tokens, where the GEMV took 0.78–1.94×); fp32 inputs have no such kernel, and the
    GEMV beats the fp32 tiles up to ~16 tokens. Where the AMX kernel runs, the GEMV keeps 1–3 bf16 tokens (one
    Xeon thread, INT4 GPR 1: at 2 tokens the GEMV took 0.5–0.9× AMX's time, at 4 tokens 0.6–1.0× on 576↔1536
    and 1.3–1.7× on 2048²–4096²). The limits live in ``cpu/linear_dispatch.cpp``, whose kernel choice
    (:func:`kernel_for`) uses the same function."""
    ext = extension()
    return MAX_TOKENS if ext is None else ext.gemv_max_tokens(dtype == torch.bfloat16, isa())


def kernel_for(tokens: int, dtype: torch.dtype, in_features: int, gpr: int = 1) -> str:
    """Which kernel :func:`linear_any` runs for this many tokens of a layer of ``in_features`` columns in ``gpr``
    groups: ``gemv``, ``bf16_gemv``, ``amx``, ``bf16_dot`` or ``tiles``."""
    return extension().linear_kernel(tokens, dtype == torch.bfloat16, in_features, gpr, isa())


def linear_any(x: torch.Tensor, packed: torch.Tensor, codebook: torch.Tensor, bias: torch.Tensor | None, bits: int,
               in_features: int) -> torch.Tensor:
    """y = x·Ŵᵀ (+ bias), x (..., in) fp32 or bf16 → (..., out) in x's dtype: the whole CPU inference path in one C++
    call (``cpu/linear_dispatch.cpp``), the kernel chosen by token count as :func:`kernel_for` says (making that
    choice in Python cost ~20 µs per layer, half of a small layer's one-token GEMV): up to :func:`gemv_tokens`
    the GEMV (for bf16 inputs the bf16 GEMV where :func:`bf16_gemv` says it runs); bf16 inputs of up to
    :data:`AMX_MAX_TOKENS` (64) tokens on the AMX kernel where the CPU has AMX and ``in_features`` is a multiple
    of 32 (one Xeon thread, bits 2/4 × GPR 1/4, 576↔1536 to 4096², ``benchmarks/results/cpu_batched_amx.json``:
    0.63–1.17× dense bf16's time at 4–32 tokens, where the bf16 dot kernel took 1.0–5×; at 256 tokens the tiles
    took 0.57–0.71× the AMX kernel's time, which streams all of x past every 32-row panel), else up to
    :data:`BF16_DOT_MAX_TOKENS` (32) on the batched bf16 kernel where the CPU has AVX512-BF16; everything else Ŵ
    one ~4 MiB row tile at a time into torch's GEMM (which from ~64 tokens on beat the bf16 kernel: in
    ``benchmarks/results/cpu_batched.json`` it took 1.13–1.43× dense bf16's time at 64 tokens where the tiles
    took 1.07–1.15× at 128; torch's GEMM is better blocked for many tokens)."""
    return extension().linear_cpu(x, packed, codebook, bias, bits, in_features, isa())


def linear_backward(grad_out: torch.Tensor, x: torch.Tensor | None, packed: torch.Tensor,
                    codebook: torch.Tensor | None, bits: int, in_features: int, gpr: int, need_x: bool = True,
                    need_codebook: bool = True, bf16_product: bool = False):
    """(∂x fp32 or None, ∂codebook fp32 (out, gpr, 2^bits) or None) of y = x·Ŵᵀ, tile by tile.

    ``codebook`` is needed only for ∂x and ``x`` only for ∂codebook. ``bf16_product``: ∂codebook's dYᵀX from
    dY and x rounded to bf16 on torch's bf16 GEMM (see ``cpu/tiles.cpp``)."""
    empty = packed.new_empty(0, dtype=torch.float32)
    gx, gcb = extension().linear_backward(grad_out, empty if x is None else x, packed,
                                          empty if codebook is None else codebook, bits, in_features, gpr,
                                          need_x, need_codebook, isa(), bf16_product)
    return (gx if need_x else None), (gcb if need_codebook else None)


def bin_reduce(grad_weight: torch.Tensor, packed: torch.Tensor, bits: int, gpr: int) -> torch.Tensor:
    """∂codebook (out, gpr, 2^bits) fp32 from a dense ∂Ŵ."""
    return extension().bin_reduce(grad_weight, packed, bits, gpr, isa())
