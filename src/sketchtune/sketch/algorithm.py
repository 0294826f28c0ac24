"""Learning to sketch one weight matrix (the paper's Algorithm 1), as pure functions.

Given a weight W (r × c) and the Hessian of its layer-wise output error H = 2XXᵀ (c × c), every row is split
into ``gpr`` contiguous groups and each row-group is compressed to k = 2^bits values (its *codebook*, the
paper's sketched parameters) plus one integer code per weight (the paper's mapping matrix M, stored as
indices). Per group:

1. the codebook is learned by weighted 1-D k-means on the group's *current* weights, i.e. after the error
   compensation from every column mapped so far (importance of column i = (1/[H⁻¹]ᵢᵢ)^s, or LeanQuant's
   diag(U)⁻ˢ with U the upper Cholesky factor of H⁻¹);
2. columns are mapped one by one to their nearest codebook entry, and the rounding error is pushed into the
   not-yet-mapped columns through U (GPTQ's Cholesky form of the optimal brain surgeon update), lazily in
   blocks of 128 columns so the bulk of the work is one matrix product per block.

The same loop with a uniform min/max grid instead of k-means *is* GPTQ, so the baseline shares this code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from ..errors import SketchError
from ..layout import check_layout, dequantize_codes
from .kmeans import assign_nearest, row_chunks, weighted_kmeans_1d
from .refit import refit_codebooks

Importance = Literal["paper", "cholesky"]
CodebookFn = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]

@dataclass
class SketchResult:
    """Codebooks (r, gpr, 2^bits) in fp32 and codes (r, c) uint8; ``Ŵ = codebook[row, group(col), code]``."""

    codebook: torch.Tensor
    codes: torch.Tensor

    def dequantize(self) -> torch.Tensor:
        """Dense Ŵ (r, c) — :func:`sketchtune.layout.dequantize_codes`."""
        return dequantize_codes(self.codebook, self.codes)


def prepare_hessian(
    weight: torch.Tensor, hessian: torch.Tensor, percdamp: float = 0.01, keep_damped: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Validate, fix dead columns, damp, and factor H.

    Returns ``(W, H, U)`` in fp32: W with dead columns zeroed (their input is always 0, so any value is
    exact), the damped H (``None`` unless ``keep_damped``), and U = upper Cholesky factor of H⁻¹. If H is still
    not positive definite the damping grows tenfold up to 100% of the mean diagonal before we give up with a
    clear error. ``hessian`` is never modified; besides it, at most two c × c matrices are alive at once
    (the damped copy and its factor, then the factor and H⁻¹, then H⁻¹ and U) — a 5632-wide layer's H is
    127 MB, so this is what bounds a large model's sketching memory.
    """
    W = weight.detach().float().clone()
    H = hessian.detach().float()
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise SketchError(f"Hessian shape {tuple(H.shape)} does not match weight shape {tuple(W.shape)}")
    if not torch.isfinite(W).all():
        raise SketchError("weight contains NaN or Inf values; cannot sketch a non-finite matrix")
    if not torch.isfinite(H).all():
        raise SketchError("Hessian contains NaN or Inf values (non-finite activations in calibration?)")
    dead = torch.diag(H) == 0
    if bool(dead.any()):
        H = H.clone()
        H[dead, dead] = 1.0
        W[:, dead] = 0.0
    diag = torch.diag(H).clone()
    mean_diag = diag.mean()
    damp = percdamp
    while True:
        Hd = H.clone()
        Hd.diagonal().copy_(diag + damp * mean_diag)  # = H + λI, without a c × c identity
        L, info = torch.linalg.cholesky_ex(Hd)
        if not keep_damped:
            Hd = None
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            del L
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            del Hinv
            if int(info) == 0 and torch.isfinite(U).all():
                return W, Hd, U
        else:
            del L
        if damp >= 1.0:
            raise SketchError(f"Hessian is singular even with damping {damp:g} × mean diagonal")
        damp = min(damp * 10 if damp > 0 else 1e-4, 1.0)


def importance_weights(U: torch.Tensor, s: float, kind: Importance = "paper") -> torch.Tensor:
    """Per-column k-means weights from the inverse Hessian.

    ``paper``: (1/[H⁻¹]ᵢᵢ)^s as written in the paper (Eq. 4). ``cholesky``: diag(U)^(−s) as in the
    authors' LeanQuant code. Computed in log space and scaled to max 1, so large ``s`` cannot overflow.
    """
    if kind == "paper":
        log_d = torch.log((U * U).sum(dim=0))  # [H⁻¹]ᵢᵢ = Σⱼ Uⱼᵢ² since H⁻¹ = UᵀU
    elif kind == "cholesky":
        log_d = torch.log(torch.diag(U))
    else:
        raise SketchError(f"importance must be 'paper' or 'cholesky', got {kind!r}")
    logw = -s * log_d
    return torch.exp(logw - logw.max())


def kmeans_codebook(weights: torch.Tensor, importance: torch.Tensor, k: int) -> torch.Tensor:
    """SketchTune's codebook: weighted k-means centres of each row of the group."""
    return weighted_kmeans_1d(weights, importance, k)[0]


def uniform_codebook(weights: torch.Tensor, importance: torch.Tensor, k: int) -> torch.Tensor:
    """GPTQ/RTN's asymmetric min–max grid (range widened to include 0, zero point rounded), as a codebook."""
    xmin = weights.min(dim=1).values.clamp_max(0)
    xmax = weights.max(dim=1).values.clamp_min(0)
    flat = xmax == xmin
    xmin = torch.where(flat, xmin - 1, xmin)
    xmax = torch.where(flat, xmax + 1, xmax)
    scale = (xmax - xmin) / (k - 1)
    zero = torch.round(-xmin / scale)
    levels = torch.arange(k, device=weights.device, dtype=weights.dtype)
    return scale[:, None] * (levels[None, :] - zero[:, None])


def sketch_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int = 4,
    gpr: int = 1,
    s: float = 3.0,
    importance: Importance = "cholesky",
    percdamp: float = 0.01,
    blocksize: int = 128,
    refit: bool = False,
    codebook_fn: CodebookFn = kmeans_codebook,
) -> SketchResult:
    """Sketch ``weight`` (r × c) into codebooks (r, gpr, 2^bits) and codes (r, c), minimising ‖(W − Ŵ)X‖².

    ``refit`` replaces each row's codebooks by the closed-form least-squares optimum for the final codes
    (see :mod:`sketchtune.sketch.refit`). ``codebook_fn`` defaults to weighted k-means; pass
    :func:`uniform_codebook` for GPTQ.
    """
    check_layout(bits, gpr, weight.shape[1])
    W, H, U = prepare_hessian(weight, hessian, percdamp, keep_damped=refit)
    r, c = W.shape
    k = 2**bits
    group = c // gpr
    imp = importance_weights(U, s, importance)
    codebook = torch.empty(r, gpr, k, device=W.device)
    codes = torch.empty(r, c, dtype=torch.uint8, device=W.device)
    W_orig = W.clone() if refit else None

    for g in range(gpr):
        start, stop = g * group, (g + 1) * group
        cb = codebook_fn(W[:, start:stop], imp[start:stop], k)
        codebook[:, g] = cb
        for i1 in range(start, stop, blocksize):
            i2 = min(i1 + blocksize, stop)
            # Column-major copy of the block: the per-column rank-1 update then touches contiguous memory.
            W1 = W[:, i1:i2].T.contiguous()
            U1 = U[i1:i2, i1:i2]
            err = torch.empty_like(W1)
            for j in range(i2 - i1):
                w = W1[j]
                idx = (w[:, None] - cb).abs().argmin(dim=1)
                q = cb.gather(1, idx[:, None]).squeeze(1)
                e = (w - q) / U1[j, j]
                W1[j:] -= U1[j, j:, None] * e[None, :]
                err[j] = e
                codes[:, i1 + j] = idx.to(torch.uint8)
            W[:, i2:].addmm_(err.T, U[i1:i2, i2:], alpha=-1)  # in place: no (r × c) temporary per block

    if refit:
        codebook = refit_codebooks(W_orig, H, codes, codebook)
    return SketchResult(codebook=codebook, codes=codes)


def round_to_nearest(
    weight: torch.Tensor, bits: int = 4, gpr: int = 1, codebook: torch.Tensor | None = None
) -> SketchResult:
    """RTN: every weight to its nearest codebook entry with no error compensation.

    Without ``codebook`` the per-row-group uniform min/max grid is used (the classic RTN baseline); with one,
    this is the "nearest rounding with the same codebooks" reference the GPTQ-style mapping must beat.
    """
    check_layout(bits, gpr, weight.shape[1])
    W = weight.detach().float()
    if not torch.isfinite(W).all():
        raise SketchError("weight contains NaN or Inf values; cannot sketch a non-finite matrix")
    r, c = W.shape
    k, group = 2**bits, c // gpr
    groups = W.reshape(r, gpr, group)
    if codebook is None:
        flat = groups.reshape(r * gpr, group)
        codebook = uniform_codebook(flat, torch.ones(group, device=W.device), k).reshape(r, gpr, k)
    idx = assign_nearest(groups.reshape(r * gpr, group), codebook.reshape(r * gpr, k).float())
    return SketchResult(codebook=codebook.float(), codes=idx.reshape(r, c).to(torch.uint8))


def output_error(weight: torch.Tensor, approx: torch.Tensor, hessian: torch.Tensor) -> float:
    """Layer-output error ‖(W − Ŵ)X‖²_F expressed through H = 2XXᵀ: ½·tr((W−Ŵ) H (W−Ŵ)ᵀ)."""
    D = (weight.float() - approx.float())
    return 0.5 * float(((D @ hessian.float()) * D).sum())


def relative_output_error(weight: torch.Tensor, sketch: SketchResult, hessian: torch.Tensor,
                          block_elements: int = 1 << 20) -> float:
    """‖(W − Ŵ)X‖² / ‖WX‖² (:func:`output_error` over the error of Ŵ = 0), a block of rows at a time.

    Ŵ is decoded block by block from the codes, never whole: for a 5632-wide matrix the whole-matrix form
    held five r × c temporaries at once, the largest transient of a streamed sketch after the Hessian's factor.
    """
    H = hessian.float()
    blocks = row_chunks(*weight.shape, block_elements)
    num = den = 0.0
    for i in blocks:
        rows = slice(i, i + blocks.step)
        W = weight[rows].float()
        D = W - dequantize_codes(sketch.codebook[rows], sketch.codes[rows])
        num += float(((D @ H) * D).sum())
        den += float(((W @ H) * W).sum())
    return num / max(den, 1e-30)
