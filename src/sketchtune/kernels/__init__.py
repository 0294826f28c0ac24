"""Fast paths for ``SketchedLinear``: Triton kernels as ``sketchtune::*`` custom ops, and a CPU decode cache.

``sketched_linear`` (:mod:`.dispatch`) is the entry point; :mod:`.ops` registers the custom ops (importing
this package is enough), :mod:`.triton_kernels` holds the kernels (imported lazily — triton is optional),
:mod:`.dense_cache` the CPU inference cache. The pure-PyTorch ``sketchtune.layout.dequantize`` + ``F.linear``
stays the ground truth every path is tested against. The kernels depend only on the format
(:mod:`sketchtune.layout`); ``SketchedLinear`` calls them.
"""

from .dense_cache import DenseWeightCache
from .dispatch import BACKEND_ENV, backend_for, sketched_linear
from .ops import GEMV_MAX_TOKENS, triton_available, triton_runs_on

__all__ = [
    "BACKEND_ENV",
    "DenseWeightCache",
    "GEMV_MAX_TOKENS",
    "backend_for",
    "sketched_linear",
    "triton_available",
    "triton_runs_on",
]
