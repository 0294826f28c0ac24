"""Closed-form codebook refit (beyond the paper).

Once the codes are fixed, Ŵ is linear in the codebooks, so the layer-output error ‖(W − Ŵ)X‖² has an exact
minimiser per row. Write a row's reconstruction as ŵ = c Oᵀ, with c the row's concatenated codebooks
(gpr·k values) and O (cols × gpr·k) the one-hot map of each column to its (group, code) slot. Setting the
gradient to zero gives the normal equations c (Oᵀ H O) = w H O — the paper's Eq. 10 projection, weighted by
H. A small ridge towards the k-means codebook keeps unused codes where they were and makes every system
solvable. Solving all groups of a row jointly is exact; groups are coupled through H's off-diagonal blocks.
"""

from __future__ import annotations

import torch

from ..layout import codebook_slots


def refit_codebooks(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    codes: torch.Tensor,
    codebook: torch.Tensor,
    ridge: float = 1e-4,
    max_chunk_elems: int = 1 << 25,
) -> torch.Tensor:
    """Least-squares codebooks (r, gpr, k) for fixed ``codes``; never worse than ``codebook`` on ‖(W−Ŵ)X‖²
    up to the ridge term."""
    r, gpr, k = codebook.shape
    c = codes.shape[1]
    slots = gpr * k
    W = weight.float()
    H = hessian.float()
    slot_of = codebook_slots(codes, gpr, k)
    WH = W @ H
    out = torch.empty(r, slots, device=W.device)
    chunk = max(1, max_chunk_elems // (c * slots))
    eye = torch.eye(slots, device=W.device)
    for r0 in range(0, r, chunk):
        r1 = min(r, r0 + chunk)
        idx = slot_of[r0:r1]
        onehot = torch.zeros(r1 - r0, c, slots, device=W.device).scatter_(2, idx[:, :, None], 1.0)
        A = onehot.transpose(1, 2) @ (H @ onehot)
        b = torch.zeros(r1 - r0, slots, device=W.device).scatter_add_(1, idx, WH[r0:r1])
        c0 = codebook[r0:r1].reshape(r1 - r0, slots).float()
        lam = ridge * A.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)
        A = A + lam[:, None, None] * eye
        b = b + lam[:, None] * c0
        out[r0:r1] = torch.linalg.solve(A, b[:, :, None]).squeeze(2)  # A is symmetric: cA = b ⇔ Ac = b
    return out.reshape(r, gpr, k)
