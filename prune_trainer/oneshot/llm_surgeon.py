"""LLM Surgeon's costs and weight updates for one Linear under ``F = G ⊗ A`` (van der Ouderaa, Nagel, van Baalen,
Asano & Blankevoort 2024, "The LLM Surgeon", §3.2–3.4 and App. A). Pure tensor functions.

``W`` is the ``R × C`` weight (with the bias as a last column when the factors carry one, see `kfac`), flattened
row-major, so ``F[(r,c),(r',c')] = G_rr' A_cc'`` and ``(G ⊗ A)⁻¹ = G⁻¹ ⊗ A⁻¹``. Removing the weights ``K`` costs
(eq. 15) ``½ θ_Kᵀ (E_K F⁻¹ E_Kᵀ)⁻¹ θ_K`` and the optimal update of the rest is (eq. 16)
``Δθ = −F⁻¹ E_Kᵀ (E_K F⁻¹ E_Kᵀ)⁻¹ θ_K``. Special cases used here:

- one element ``(r, c)`` (eq. 17/19): ``½ W_rc² / ([G⁻¹]_rr [A⁻¹]_cc)``; OBD (eq. 18/19): ``½ W_rc² G_rr A_cc``;
- a group of rows ``R'`` (eq. 20 generalised, A.4): ``½ tr((E_R' G⁻¹ E_R'ᵀ)⁻¹ W̄ A W̄ᵀ)``, ``W̄ = E_R' W``;
  one row: ``½ θ_rᵀ A θ_r / [G⁻¹]_rr``; update (eq. 27) ``ΔW = −G⁻¹ E_R'ᵀ (E_R' G⁻¹ E_R'ᵀ)⁻¹ W̄``;
- a group of columns ``C'``: ``½ tr((E_C' A⁻¹ E_C'ᵀ)⁻¹ W̄ᵀ G W̄)``, ``W̄ = W E_C'ᵀ``; one column:
  ``½ θ_cᵀ G θ_c / [A⁻¹]_cc``; update (eq. 28) ``ΔW = −W̄ (E_C' A⁻¹ E_C'ᵀ)⁻¹ E_C' A⁻¹``;
- K-OBD (eq. 23, diagonal within the removed rows/columns, no update): ``½ Σ_r G_rr θ_rᵀ A θ_r`` and
  ``½ Σ_c A_cc θ_cᵀ G θ_c``;
- any element mask (unstructured, N:M): eq. 16 jointly for every removed element of the layer, solved without
  forming the ``|K| × |K|`` system: the remaining weights ``N`` solve ``P_N(G Δ A) = 0`` with ``Δ_K = −θ_K``,
  by preconditioned conjugate gradients on ``X ↦ P_N(G X A)`` (Jacobi preconditioner ``G_rr A_cc``).
"""

from __future__ import annotations

import torch


def kron_inverse(G: torch.Tensor, A: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(G⁻¹, A⁻¹)`` by Cholesky: ``(G ⊗ A)⁻¹ = G⁻¹ ⊗ A⁻¹`` (both factors symmetric positive definite)."""
    return torch.cholesky_inverse(torch.linalg.cholesky(G)), torch.cholesky_inverse(torch.linalg.cholesky(A))


def element_costs(W: torch.Tensor, g_inv: torch.Tensor, a_inv: torch.Tensor) -> torch.Tensor:
    """``L_rc = ½ W_rc² / ([G⁻¹]_rr [A⁻¹]_cc)`` (eq. 19, OBS with the Kronecker inverse)."""
    return 0.5 * W.square() / torch.outer(torch.diagonal(g_inv), torch.diagonal(a_inv))


def element_costs_obd(W: torch.Tensor, G: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``L_rc = ½ W_rc² G_rr A_cc`` (eq. 19, OBD with the KFAC diagonal)."""
    return 0.5 * W.square() * torch.outer(torch.diagonal(G), torch.diagonal(A))


def group_index(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions grouped by id: ``(index [n, k], group id [n])`` for ``ids`` in which every id occurs ``k`` times
    (a head's ``d`` rows, a neuron's row). ValueError when the groups have different sizes."""
    uniq, counts = torch.unique(ids, return_counts=True)
    if bool((counts != counts[0]).any()):
        raise ValueError(f"groups of unequal size in one Linear: {sorted(set(counts.tolist()))}")
    order = torch.argsort(ids, stable=True)
    return order.view(uniq.numel(), int(counts[0])), uniq


def _sub(mat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``mat[index[b]][:, index[b]]`` for every row ``b`` of ``index`` ([n, k] → [n, k, k])."""
    return mat[index[:, :, None], index[:, None, :]]


def _trace_solve(S: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``tr(S_b⁻¹ M_b)`` for batches of symmetric positive definite ``S``."""
    return torch.diagonal(torch.linalg.solve(S, M), dim1=-2, dim2=-1).sum(-1)


def row_group_costs(W: torch.Tensor, A: torch.Tensor, g_inv: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``½ tr((E_R' G⁻¹ E_R'ᵀ)⁻¹ W̄ A W̄ᵀ)`` for each group of rows ``index[b]`` (eq. 20; A.4). [n]"""
    bar = W[index]  # [n, k, C]
    return 0.5 * _trace_solve(_sub(g_inv, index), bar @ A @ bar.transpose(1, 2))


def col_group_costs(W: torch.Tensor, G: torch.Tensor, a_inv: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``½ tr((E_C' A⁻¹ E_C'ᵀ)⁻¹ W̄ᵀ G W̄)`` for each group of columns ``index[b]`` (eq. 22; A.4). [n]"""
    bar = W.T[index]  # [n, k, R]: the group's columns as rows
    return 0.5 * _trace_solve(_sub(a_inv, index), bar @ G @ bar.transpose(1, 2))


def row_group_costs_obd(W: torch.Tensor, A: torch.Tensor, G: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """K-OBD: ``½ Σ_{r ∈ R'} G_rr θ_rᵀ A θ_r`` (eq. 23). [n]"""
    per_row = 0.5 * torch.diagonal(G) * ((W @ A) * W).sum(1)
    return per_row[index].sum(1)


def col_group_costs_obd(W: torch.Tensor, G: torch.Tensor, A: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """K-OBD: ``½ Σ_{c ∈ C'} A_cc θ_cᵀ G θ_c`` (eq. 23). [n]"""
    per_col = 0.5 * torch.diagonal(A) * ((G @ W) * W).sum(0)
    return per_col[index].sum(1)


def remove_rows(W: torch.Tensor, g_inv: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``W + ΔW`` with ``ΔW = −G⁻¹ E_R'ᵀ (E_R' G⁻¹ E_R'ᵀ)⁻¹ W̄`` (eq. 27): the rows ``rows`` removed together,
    the other rows corrected for all of them at once; removed rows exactly zero."""
    if rows.numel() == 0:
        return W.clone()
    out = W - g_inv[:, rows] @ torch.linalg.solve(g_inv[rows][:, rows], W[rows])
    out[rows] = 0.0
    return out


def remove_cols(W: torch.Tensor, a_inv: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``W + ΔW`` with ``ΔW = −W̄ (E_C' A⁻¹ E_C'ᵀ)⁻¹ E_C' A⁻¹`` (eq. 28): columns ``cols`` removed together."""
    if cols.numel() == 0:
        return W.clone()
    out = W - W[:, cols] @ torch.linalg.solve(a_inv[cols][:, cols], a_inv[cols])
    out[:, cols] = 0.0
    return out


def masked_update(
    W: torch.Tensor, G: torch.Tensor, A: torch.Tensor, prune: torch.Tensor, max_iter: int = 100, tol: float = 1e-5
) -> tuple[torch.Tensor, int]:
    """The weights after removing every element of the mask ``prune`` at once with the optimal correlated update
    (eq. 16): ``argmin ½ vec(Ŵ−W)ᵀ (G⊗A) vec(Ŵ−W)`` s.t. ``Ŵ[prune] = 0``, by Jacobi-preconditioned conjugate
    gradients on the remaining weights (stops at ``‖r‖ ≤ tol·‖b‖`` or ``max_iter``). Returns ``(Ŵ, iterations)``."""
    free = (~prune).to(W.dtype)
    b = -(G @ (-W * prune) @ A) * free  # right-hand side −P_N(G Δ_K A)
    precond = torch.outer(torch.diagonal(G), torch.diagonal(A)).clamp_min(torch.finfo(W.dtype).tiny)
    x = torch.zeros_like(W)
    r = b.clone()
    z = r / precond
    p = z.clone()
    rz = (r * z).sum()
    b_norm = float(b.norm())
    it = 0
    while it < max_iter and float(r.norm()) > tol * b_norm:
        Ap = (G @ p @ A) * free
        alpha = rz / (p * Ap).sum()
        x.add_(alpha * p)
        r.sub_(alpha * Ap)
        z = r / precond
        rz_new = (r * z).sum()
        p = z + (rz_new / rz) * p
        rz = rz_new
        it += 1
    return (W + x) * free, it
