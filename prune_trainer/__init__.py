"""prune_trainer: training-time and one-shot pruning of Hugging Face models as `Trainer` callbacks."""

from prune_trainer.callbacks import (
    DistillationCallback,
    FiniteCheckCallback,
    MagnitudeOptions,
    MagnitudePruningCallback,
    MethodNeeds,
    MovementOptions,
    MovementPruningCallback,
    NMOptions,
    NMSparsityCallback,
    OBERTOptions,
    OBERTPruningCallback,
    PruningCallback,
    PruningContext,
    SparsityLoggingCallback,
    StructuredMovementCallback,
    StructuredMovementOptions,
    StructuredOptions,
    StructuredPruningCallback,
    TaylorOptions,
    TaylorPruningCallback,
    make_pruning_callback,
    register_method,
)
from prune_trainer.config import PruningConfig
from prune_trainer.data import load_conll_splits, make_compute_metrics, tokenize_and_align
from prune_trainer.export import export_pruned_model, export_structured_model, load_pruned_model, sparsity_report
from prune_trainer.masking import MaskedLinear, inject_masked_layers, unwrap_masked_layers
from prune_trainer.models import load_model_and_tokenizer
from prune_trainer.oneshot.runner import OneShotConfig, run_oneshot
from prune_trainer.oneshot.surgeon import SurgeonOptions
from prune_trainer.options import Options
from prune_trainer.schedules import PruningSchedule
from prune_trainer.structures import find_structures

__version__ = "0.1.0"

__all__ = [
    # training-time methods and their options
    "PruningCallback", "MethodNeeds", "PruningContext", "make_pruning_callback", "register_method",
    "MagnitudePruningCallback", "MagnitudeOptions", "MovementPruningCallback", "MovementOptions",
    "OBERTPruningCallback", "OBERTOptions", "NMSparsityCallback", "NMOptions",
    "TaylorPruningCallback", "TaylorOptions", "StructuredPruningCallback", "StructuredOptions",
    "StructuredMovementCallback", "StructuredMovementOptions",
    # other callbacks
    "DistillationCallback", "FiniteCheckCallback", "SparsityLoggingCallback",
    # configuration
    "Options", "PruningConfig", "PruningSchedule",
    # masking and export
    "MaskedLinear", "inject_masked_layers", "unwrap_masked_layers", "export_pruned_model", "sparsity_report",
    "export_structured_model", "load_pruned_model", "find_structures",
    # one-shot pruning
    "OneShotConfig", "run_oneshot", "SurgeonOptions",
    # models and data
    "load_model_and_tokenizer", "load_conll_splits", "tokenize_and_align", "make_compute_metrics",
]
