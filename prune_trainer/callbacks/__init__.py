"""Trainer callbacks: the pruning methods (one contract, `PruningCallback`), distillation and sparsity logging."""

from prune_trainer.callbacks.base import MethodNeeds, PruningCallback, PruningContext
from prune_trainer.callbacks.distillation import DistillationCallback
from prune_trainer.callbacks.finite import FiniteCheckCallback
from prune_trainer.callbacks.fixed_mask import FixedMaskCallback, FixedMaskOptions
from prune_trainer.callbacks.magnitude import MagnitudeOptions, MagnitudePruningCallback
from prune_trainer.callbacks.movement import MovementOptions, MovementPruningCallback
from prune_trainer.callbacks.nm import NMOptions, NMSparsityCallback
from prune_trainer.callbacks.obert import OBERTOptions, OBERTPruningCallback
from prune_trainer.callbacks.registry import (
    PRUNING_CALLBACKS,
    make_pruning_callback,
    options_class,
    pruning_callback_class,
    register_method,
)
from prune_trainer.callbacks.sparsity_logging import SparsityLoggingCallback
from prune_trainer.callbacks.structured import StructuredOptions, StructuredPruningCallback
from prune_trainer.callbacks.structured_movement import StructuredMovementCallback, StructuredMovementOptions
from prune_trainer.callbacks.taylor import TaylorOptions, TaylorPruningCallback

__all__ = [
    "PRUNING_CALLBACKS",
    "DistillationCallback",
    "FiniteCheckCallback",
    "FixedMaskCallback",
    "FixedMaskOptions",
    "MagnitudeOptions",
    "MagnitudePruningCallback",
    "MethodNeeds",
    "MovementOptions",
    "MovementPruningCallback",
    "NMOptions",
    "NMSparsityCallback",
    "OBERTOptions",
    "OBERTPruningCallback",
    "PruningCallback",
    "PruningContext",
    "SparsityLoggingCallback",
    "StructuredMovementCallback",
    "StructuredMovementOptions",
    "StructuredOptions",
    "StructuredPruningCallback",
    "TaylorOptions",
    "TaylorPruningCallback",
    "make_pruning_callback",
    "options_class",
    "pruning_callback_class",
    "register_method",
]
