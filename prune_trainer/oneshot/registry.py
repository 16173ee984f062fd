"""Name → per-layer one-shot pruner, with the calibration statistics each one needs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from prune_trainer.oneshot.base import LayerStats
from prune_trainer.oneshot.magnitude import magnitude_prune
from prune_trainer.oneshot.obs import obs_prune
from prune_trainer.oneshot.sparsegpt import sparsegpt_prune
from prune_trainer.oneshot.wanda import wanda_prune

PruneFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""``fn(weight, stats: LayerStats, sparsity, prunen=0, prunem=0, **kwargs) -> (pruned weight, keep mask)``."""


@dataclass(frozen=True)
class OneShotMethod:
    name: str
    prune: PruneFn
    needs_hessian: bool  # collect X Xᵀ (else only the column norms ‖X_j‖²)
    needs_calibration: bool = True  # False: data-free (no forward pass at all)


ONESHOT_METHODS: dict[str, OneShotMethod] = {
    "magnitude": OneShotMethod("magnitude", magnitude_prune, needs_hessian=False, needs_calibration=False),
    "wanda": OneShotMethod("wanda", wanda_prune, needs_hessian=False),
    "sparsegpt": OneShotMethod("sparsegpt", sparsegpt_prune, needs_hessian=True),
    "obs": OneShotMethod("obs", obs_prune, needs_hessian=True),
}


def get_method(name: str) -> OneShotMethod:
    if name not in ONESHOT_METHODS:
        from prune_trainer.oneshot.surgeon import SURGEON_METHODS

        raise ValueError(
            f"unknown one-shot method {name!r}; choose one of {sorted(ONESHOT_METHODS) + list(SURGEON_METHODS)}"
        )
    return ONESHOT_METHODS[name]


__all__ = ["ONESHOT_METHODS", "LayerStats", "OneShotMethod", "PruneFn", "get_method"]
