"""Reading logged runs: the history of an offline W&B run, without network."""

from prune_trainer.reporting.wandb_offline import read_wandb_history, sparsity_curve_from_wandb

__all__ = ["read_wandb_history", "sparsity_curve_from_wandb"]
