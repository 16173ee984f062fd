"""Export: plain `save_pretrained` checkpoints with zeros baked in, plus a sparsity report; structurally pruned
models sliced to their kept heads and neurons (`export_structured_model`, `load_pruned_model`)."""

from prune_trainer.export.export import (
    SPARSITY_FILE,
    export_pruned_model,
    has_model_weights,
    is_complete_model_dir,
    sparsity_report,
)
from prune_trainer.export.structured import STRUCTURE_FIELD, export_structured_model, load_pruned_model, slice_model

__all__ = [
    "SPARSITY_FILE", "STRUCTURE_FIELD", "export_pruned_model", "export_structured_model", "has_model_weights",
    "is_complete_model_dir", "load_pruned_model", "slice_model", "sparsity_report",
]
