"""Sparsity measurements: fraction of exactly-zero weights, globally and per layer."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from prune_trainer.masking.inject import find_target_linears
from prune_trainer.masking.masked_linear import MaskedLinear


def weight_sparsity_report(
    model: nn.Module, layer_names: Iterable[str] | None = None
) -> dict[str, object]:
    """Zeros in the weights of the given Linear layers (default: the wrapped layers, else the family's default targets).

    Returns ``{"global_sparsity", "num_zeros", "num_weights", "layers": {name: sparsity}}``, with
    the global value ``Σ zeros / Σ weights`` over the layers. Works on wrapped and plain models.
    """
    if layer_names is None:
        layer_names = [n for n, m in model.named_modules() if isinstance(m, MaskedLinear)] or \
            find_target_linears(model)
    zeros = total = 0
    layers: dict[str, float] = {}
    with torch.no_grad():
        for name in layer_names:
            weight = model.get_submodule(name).weight
            z = int((weight == 0).sum())
            zeros += z
            total += weight.numel()
            layers[name] = z / weight.numel()
    return {
        "global_sparsity": zeros / total if total else 0.0,
        "num_zeros": zeros,
        "num_weights": total,
        "layers": layers,
    }


def mask_sparsity(layers: dict[str, MaskedLinear]) -> tuple[float, dict[str, float]]:
    """Fraction of masked-out weights: global and per layer (from the masks, not the weights)."""
    pruned = total = 0
    per_layer = {}
    for name, layer in layers.items():
        p = int((~layer.weight_mask).sum())
        pruned += p
        total += layer.weight_mask.numel()
        per_layer[name] = p / layer.weight_mask.numel()
    return (pruned / total if total else 0.0), per_layer
