"""Export: plain `save_pretrained` checkpoints with zeros baked in, plus a sparsity report."""

from prune_trainer.export.export import (
    SPARSITY_FILE,
    export_pruned_model,
    has_model_weights,
    is_complete_model_dir,
    sparsity_report,
)

__all__ = ["SPARSITY_FILE", "export_pruned_model", "has_model_weights", "is_complete_model_dir", "sparsity_report"]
