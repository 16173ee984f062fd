"""Magnitude importance: ``|W_ij|`` (the gradual magnitude pruning baseline, Zhu & Gupta 2017)."""

from __future__ import annotations

import torch

from prune_trainer.masking.masked_linear import MaskedLinear


def magnitude_scores(layers: dict[str, MaskedLinear]) -> dict[str, torch.Tensor]:
    """``|W|`` per layer (detached)."""
    return {name: layer.weight.detach().abs() for name, layer in layers.items()}
