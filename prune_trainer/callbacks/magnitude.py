"""`MagnitudePruningCallback`: gradual magnitude pruning on the schedule (the baseline)."""

from __future__ import annotations

from typing import Any

import torch

from prune_trainer.callbacks.base import PruningCallback
from prune_trainer.methods.magnitude import magnitude_scores


class MagnitudePruningCallback(PruningCallback):
    """At each pruning step keep the largest-``|W|`` weights for the scheduled sparsity.

    Example::

        cb = MagnitudePruningCallback(model, final_sparsity=0.9, end_step=0.7, frequency=100)
        Trainer(model=model, args=args, ..., callbacks=[cb, SparsityLoggingCallback(model)])
    """

    method_name = "magnitude"

    def compute_scores(self, **kwargs: Any) -> dict[str, torch.Tensor]:
        return magnitude_scores(self.layers)
