"""prune_trainer: training-time and one-shot pruning of transformer encoders for HF `Trainer`."""

from prune_trainer.callbacks import (
    MagnitudePruningCallback,
    PruningCallback,
    SparsityLoggingCallback,
    make_pruning_callback,
)
from prune_trainer.config import PruningConfig
from prune_trainer.export import export_pruned_model, sparsity_report
from prune_trainer.masking import MaskedLinear, inject_masked_layers, unwrap_masked_layers
from prune_trainer.schedules import PruningSchedule

__version__ = "0.1.0"

__all__ = [
    "MagnitudePruningCallback",
    "MaskedLinear",
    "PruningCallback",
    "PruningConfig",
    "PruningSchedule",
    "SparsityLoggingCallback",
    "export_pruned_model",
    "inject_masked_layers",
    "make_pruning_callback",
    "sparsity_report",
    "unwrap_masked_layers",
]
