"""Trainer callbacks: pruning methods and sparsity logging."""

from prune_trainer.callbacks.base import PruningCallback
from prune_trainer.callbacks.magnitude import MagnitudePruningCallback
from prune_trainer.callbacks.registry import PRUNING_CALLBACKS, make_pruning_callback, register_pruning_callback
from prune_trainer.callbacks.sparsity_logging import SparsityLoggingCallback

__all__ = [
    "PRUNING_CALLBACKS",
    "MagnitudePruningCallback",
    "PruningCallback",
    "SparsityLoggingCallback",
    "make_pruning_callback",
    "register_pruning_callback",
]
