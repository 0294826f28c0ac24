"""Native CPU kernels (C++, AVX-512 / AVX2 picked at run time), built on first use and cached.

``cpu/lut_gemv.cpp`` computes y = x·Ŵᵀ for up to 16 tokens straight from the packed codes and codebooks,
never materialising Ŵ (see the file's header for how). It is compiled with ``torch.utils.cpp_extension.load``
the first time it is needed — about half a minute, once per machine and torch version; the build is cached in
torch's extension directory — and used by the ``sketchtune::lut_gemv`` op on CPU. Without a compiler, or on a
CPU with neither AVX2 nor AVX-512, a one-line warning says so and the pure-PyTorch reference path is used.

``SKETCHTUNE_CPU_ISA`` = ``auto`` (default) | ``avx2`` | ``avx512`` forces an instruction set (tests force
AVX2 on AVX-512 machines); ``SKETCHTUNE_CPU_KERNELS=0`` turns the native kernels off.
"""

from __future__ import annotations

import os
import warnings
from functools import cache
from pathlib import Path
from types import ModuleType

import torch

ISA_ENV = "SKETCHTUNE_CPU_ISA"
ENABLE_ENV = "SKETCHTUNE_CPU_KERNELS"
MAX_TOKENS = 16
_ISAS = {"auto": 0, "avx2": 1, "avx512": 2}
_SOURCE = Path(__file__).parent / "cpu" / "lut_gemv.cpp"


@cache
def extension() -> ModuleType | None:
    """The compiled extension, or ``None`` (warned once) where it cannot be built or the CPU lacks AVX2."""
    try:
        from torch.utils.cpp_extension import load

        ext = load(name="sketchtune_cpu_v1", sources=[str(_SOURCE)], extra_cflags=["-O3"], verbose=False)
    except Exception as e:  # no compiler, no ninja, a header problem: the reference path still works
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
        warnings.warn(f"sketchtune: native CPU kernels unavailable ({first.strip()}); using the PyTorch path",
                      stacklevel=2)
        return None
    if ext.cpu_isa() == 0:
        warnings.warn("sketchtune: this CPU has neither AVX2 nor AVX-512; using the PyTorch path", stacklevel=2)
        return None
    return ext


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
