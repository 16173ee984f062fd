"""Reporting: reading logged runs (W&B offline history) for plots and reports."""

from prune_trainer.reporting.report import (
    cost_table,
    load_oneshot_results,
    load_runs,
    method_sparsity_table,
    oneshot_cost_table,
    results_table,
    write_report,
)
from prune_trainer.reporting.wandb_offline import read_wandb_history, sparsity_curve_from_wandb

__all__ = [
    "cost_table",
    "load_oneshot_results",
    "load_runs",
    "method_sparsity_table",
    "oneshot_cost_table",
    "read_wandb_history",
    "results_table",
    "sparsity_curve_from_wandb",
    "write_report",
]
