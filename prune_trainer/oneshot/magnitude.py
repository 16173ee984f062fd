"""Magnitude pruning: drop the smallest ``|W_ij|`` of the whole layer (layer-wise threshold, as in the
Wanda reference code's magnitude baseline), or the ``M−N`` smallest of each N:M group."""

from __future__ import annotations

import torch

from prune_trainer.masking.selection import nm_mask, topk_mask
from prune_trainer.oneshot.base import LayerStats, check_pattern_args, check_weight


def magnitude_prune(
    weight: torch.Tensor, stats: LayerStats | None, sparsity: float, prunen: int = 0, prunem: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the largest ``|W_ij|`` (no calibration data used; ``stats`` is ignored)."""
    check_weight(weight)
    check_pattern_args(sparsity, prunen, prunem, weight.shape[1])
    scores = weight.abs().float()
    mask = nm_mask(scores, prunen, prunem) if prunen else topk_mask(scores, sparsity)
    return weight * mask, mask
