"""Method name → pruning callback class, for recipes and the CLI."""

from __future__ import annotations

from torch import nn

from prune_trainer.callbacks.base import PruningCallback
from prune_trainer.callbacks.magnitude import MagnitudePruningCallback
from prune_trainer.callbacks.movement import MovementPruningCallback
from prune_trainer.callbacks.nm import NMSparsityCallback
from prune_trainer.callbacks.obert import OBERTPruningCallback
from prune_trainer.config import PruningConfig

PRUNING_CALLBACKS: dict[str, type[PruningCallback]] = {
    "magnitude": MagnitudePruningCallback,
    "movement": MovementPruningCallback,
    "nm": NMSparsityCallback,
    "obert": OBERTPruningCallback,
}


def register_pruning_callback(name: str, cls: type[PruningCallback]) -> None:
    """Make ``cls`` available to recipes as ``method: name``."""
    PRUNING_CALLBACKS[name] = cls


def make_pruning_callback(model: nn.Module, config: PruningConfig, **kwargs) -> PruningCallback:
    """Instantiate the callback for ``config.method`` (clear error for an unknown name)."""
    try:
        cls = PRUNING_CALLBACKS[config.method]
    except KeyError:
        raise ValueError(
            f"unknown pruning method {config.method!r}; known: {sorted(PRUNING_CALLBACKS)}"
        ) from None
    return cls(model, config, **kwargs)
