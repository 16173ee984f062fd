"""`TaylorPruningCallback`: gradual pruning by first-order Taylor scores ``|w·∂L/∂w|`` accumulated over steps.

Math in `prune_trainer.methods.taylor` (Molchanov et al. 2019). The callback folds each optimizer step's
gradient into a per-weight score (in ``on_pre_optimizer_step``: the accumulated, clipped, DDP-averaged
gradient the optimizer is about to apply), and at the schedule's pruning steps keeps the highest scores.
Scores restart after every pruning step unless ``ema`` is set. The scores are saved in each checkpoint
(``taylor_scores.safetensors``), so a resumed run prunes exactly as an uninterrupted one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerControl, TrainerState, TrainingArguments

from prune_trainer.callbacks.base import PruningCallback, PruningContext, checkpoint_dir
from prune_trainer.io import atomic_file
from prune_trainer.methods.taylor import accumulate, taylor_importance
from prune_trainer.options import Options

SCORES_FILE = "taylor_scores.safetensors"


@dataclass
class TaylorOptions(Options):
    """``power``: 1 for ``|g·w|``, 2 for ``(g·w)²`` (Molchanov et al. 2019, eq. 8).
    ``ema``: None = mean over the steps since the last pruning step; a value in [0, 1) = exponential moving
    average with that decay, kept across pruning steps."""

    section = "taylor options"

    power: Literal[1, 2] = 1
    ema: float | None = None

    def validate(self) -> None:
        if self.ema is not None and not 0.0 <= self.ema < 1.0:
            raise ValueError(f"taylor ema must be in [0, 1) or null, got {self.ema!r}")


class TaylorPruningCallback(PruningCallback):
    """Prune the weights with the smallest accumulated first-order Taylor importance ``|w·∂L/∂w|``.

    Example::

        pruner = TaylorPruningCallback(model, final_sparsity=0.8, start_step=0.1, end_step=0.7, frequency=50)
        Trainer(model=model, args=args, ..., callbacks=[pruner]).train()
    """

    method_name = "taylor"
    options_class = TaylorOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scores = {n: torch.zeros_like(layer.weight, dtype=torch.float32) for n, layer in self.layers.items()}
        self.steps_seen = 0
        """Optimizer steps folded into ``scores`` since they were last reset."""

    def compute_masks(self, step: int, target: float, context: PruningContext) -> dict[str, torch.Tensor]:
        if self.steps_seen == 0 and target > self.current_target:
            raise ValueError(
                f"Taylor pruning at step {step} to {target:.3f} sparsity has seen no gradient yet: start pruning "
                "after at least one training step (start_step >= 1, or initial_sparsity: 0)"
            )
        masks = self.select(self.scores, target)
        if self.options.ema is None:
            self.steps_seen = 0  # the next pruning step ranks the gradients seen after this one
        return masks

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for name, layer in self.layers.items():
            if layer.weight.grad is not None:
                importance = taylor_importance(layer.weight, layer.weight.grad, self.options.power)
                score = self.scores[name]
                accumulate(score, importance.to(score.device), self.steps_seen, self.options.ema)
        self.steps_seen += 1
        super().on_pre_optimizer_step(args, state, control, **kwargs)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if state.global_step > 0:
            path = os.path.join(checkpoint_dir(args, state), SCORES_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"resuming Taylor pruning needs the scores saved at {path}")
            saved = load_file(path)
            for name, score in self.scores.items():
                score.copy_(saved[name])

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        super().on_save(args, state, control, **kwargs)
        ckpt = checkpoint_dir(args, state)
        if os.path.isdir(ckpt) and state.is_world_process_zero:
            with atomic_file(os.path.join(ckpt, SCORES_FILE)) as tmp:
                save_file({n: s.contiguous().cpu() for n, s in self.scores.items()}, str(tmp))

    def method_state(self) -> dict[str, Any]:
        return {"steps_seen": self.steps_seen}

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.steps_seen = int(state.get("steps_seen", 0))
