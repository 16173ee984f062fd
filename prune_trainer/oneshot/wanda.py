"""Wanda (Sun et al. 2023, eq. 1): score ``S_ij = |W_ij| · ‖X_j‖₂``, compared within each output row;
no weight update."""

from __future__ import annotations

import torch

from prune_trainer.oneshot.base import LayerStats, check_pattern_args, check_weight, rowwise_keep_mask


def wanda_scores(weight: torch.Tensor, col_norm: torch.Tensor) -> torch.Tensor:
    """``|W_ij| · ‖X_j‖₂`` for a ``(out, in)`` weight and the ``(in,)`` input column norms."""
    if col_norm.shape != (weight.shape[1],):
        raise ValueError(f"col_norm shape {tuple(col_norm.shape)} does not match in_features={weight.shape[1]}")
    return weight.abs().float() * col_norm.to(device=weight.device, dtype=torch.float32)[None, :]


def wanda_prune(
    weight: torch.Tensor, stats: LayerStats, sparsity: float, prunen: int = 0, prunem: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune the ``round(s·in)`` lowest Wanda scores of every row (or per N:M group)."""
    check_weight(weight)
    check_pattern_args(sparsity, prunen, prunem, weight.shape[1])
    mask = rowwise_keep_mask(wanda_scores(weight, stats.col_norm()), sparsity, prunen, prunem)
    return weight * mask, mask
