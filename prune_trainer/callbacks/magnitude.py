"""`MagnitudePruningCallback`: gradual magnitude pruning on the schedule (the baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prune_trainer.callbacks.base import PruningCallback, PruningContext
from prune_trainer.methods.magnitude import magnitude_scores
from prune_trainer.options import Options


@dataclass
class MagnitudeOptions(Options):
    """Gradual magnitude pruning has no options of its own (schedule, scope and pattern are on the config)."""

    section = "magnitude options"


class MagnitudePruningCallback(PruningCallback):
    """At each pruning step keep the largest-``|W|`` weights for the scheduled sparsity (Zhu & Gupta 2017).

    Example::

        pruner = MagnitudePruningCallback(model, final_sparsity=0.9, end_step=0.7, frequency=100)
        Trainer(model=model, args=args, ..., callbacks=[pruner])
    """

    method_name = "magnitude"
    options_class = MagnitudeOptions

    def compute_masks(self, step: int, target: float, context: PruningContext) -> dict[str, torch.Tensor]:
        return self.select(magnitude_scores(self.layers), target)
