"""Reporting: reading logged runs (W&B offline history) for plots and reports."""

from prune_trainer.reporting.report import load_runs, results_table, write_report
from prune_trainer.reporting.wandb_offline import read_wandb_history, sparsity_curve_from_wandb

__all__ = ["load_runs", "read_wandb_history", "results_table", "sparsity_curve_from_wandb", "write_report"]
