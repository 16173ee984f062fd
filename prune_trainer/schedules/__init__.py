"""Sparsity schedules (cubic, linear, constant, one-shot)."""

from prune_trainer.schedules.schedule import SCHEDULE_KINDS, PruningSchedule

__all__ = ["SCHEDULE_KINDS", "PruningSchedule"]
