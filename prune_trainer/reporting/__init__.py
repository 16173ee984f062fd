"""Reporting: reading logged runs (W&B offline history) for plots and reports."""

from prune_trainer.reporting.wandb_offline import read_wandb_history

__all__ = ["read_wandb_history"]
