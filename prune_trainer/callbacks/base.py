"""`PruningCallback`: the Trainer-side machinery shared by every training-time pruning method.

A method subclass only says how to score weights (`compute_scores`); this base class
- injects `MaskedLinear` into the target layers when constructed (before the optimizer exists);
- recomputes masks on the schedule's pruning steps (`on_step_begin`, before the step's forward);
- keeps pruned weights exactly zero: gradients masked before every optimizer step, weights
  re-masked after it (so AdamW's decoupled weight decay and momentum cannot revive them);
- makes masks identical on every rank under DDP (broadcast from rank 0);
- saves its state into each Trainer checkpoint (``pruning_state.json``) and restores it on resume;
- times its mask updates: ``pruning_time_s`` (seconds spent inside ``update_masks``, whatever the method
  does there: scoring, calibration passes, Fisher inverses, OBS updates) and ``pruning_steps`` (how many
  calls), kept in the checkpoint state so a resumed run reports the total of the whole run.
Masks themselves are persistent buffers, saved and restored with the model weights.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from prune_trainer.config import PruningConfig
from prune_trainer.masking.inject import find_target_linears, inject_masked_layers
from prune_trainer.masking.masked_linear import MaskedLinear
from prune_trainer.masking.selection import check_nm, parse_pattern, select_masks
from prune_trainer.masking.sparsity import mask_sparsity
from prune_trainer.schedules.schedule import PruningSchedule

STATE_FILE = "pruning_state.json"


def timed_update(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an ``update_masks`` so that its wall time is added to ``self.pruning_time_s``.

    Nested calls (a subclass's ``update_masks`` calling ``super().update_masks``) are counted once.
    """
    if getattr(fn, "_prune_trainer_timed", False):
        return fn

    @functools.wraps(fn)
    def wrapper(self: PruningCallback, *args: Any, **kwargs: Any) -> Any:
        if getattr(self, "_in_timed_update", False):
            return fn(self, *args, **kwargs)
        self._in_timed_update = True
        start = time.perf_counter()
        try:
            return fn(self, *args, **kwargs)
        finally:
            self.pruning_time_s = getattr(self, "pruning_time_s", 0.0) + time.perf_counter() - start
            self.pruning_steps = getattr(self, "pruning_steps", 0) + 1
            self._in_timed_update = False

    wrapper._prune_trainer_timed = True  # type: ignore[attr-defined]
    return wrapper


class PruningCallback(TrainerCallback):
    """Base class: scheduled mask updates + exact-zero maintenance + checkpoint state.

    Args:
        model: the model that will be given to `Trainer` (wrapped in place here).
        config: a `PruningConfig`; keyword arguments override its schedule fields, e.g.
            ``final_sparsity=0.9, end_step=0.7``.
    """

    method_name = "base"
    mask_in_forward = False
    monotone = True
    """Already-pruned weights stay pruned (their scores are set to -inf before selection)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Every method's own ``update_masks`` is timed (see `timed_update`)."""
        super().__init_subclass__(**kwargs)
        if "update_masks" in cls.__dict__:
            cls.update_masks = timed_update(cls.__dict__["update_masks"])  # type: ignore[method-assign]

    def __init__(self, model: nn.Module, config: PruningConfig | None = None, **schedule_overrides: Any) -> None:
        config = config or PruningConfig(method=self.method_name)
        if schedule_overrides:
            config.schedule = PruningSchedule.from_dict({**config.schedule.to_dict(), **schedule_overrides})
        config.method = self.method_name
        self.config = config
        self.model = model
        nm = parse_pattern(config.schedule.pattern)
        if nm is not None:  # validate every target layer before the model is touched
            for name in find_target_linears(model, config.targets, config.exclude):
                check_nm(*nm, model.get_submodule(name).in_features, name)
        self.layers: dict[str, MaskedLinear] = inject_masked_layers(
            model, config.targets, config.exclude, mask_in_forward=self.mask_in_forward
        )
        self.schedule: PruningSchedule = config.schedule
        self.last_pruned_step = -1
        self.current_target = 0.0
        self.pruning_time_s = 0.0
        """Wall seconds spent in ``update_masks`` over the whole run (resumes included)."""
        self.pruning_steps = 0
        """Number of ``update_masks`` calls over the whole run."""

    # ---- to implement by methods -------------------------------------------------------------
    def compute_scores(self, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Importance of every weight of every target layer (higher = keep)."""
        raise NotImplementedError

    def method_state(self) -> dict[str, Any]:
        """Extra JSON-serialisable state to save in checkpoints."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore what `method_state` saved."""

    # ---- mask updates -----------------------------------------------------------------------
    @timed_update
    @torch.no_grad()
    def update_masks(self, step: int, **kwargs: Any) -> None:
        """Prune to the schedule's target at ``step`` using the method's scores."""
        target = self.schedule.target(step)
        scores = self.compute_scores(**kwargs)
        if self.monotone:
            scores = {n: s.float().masked_fill(~self.layers[n].weight_mask, float("-inf")) for n, s in scores.items()}
        masks = select_masks(
            scores, target, self.schedule.scope, self.schedule.pattern, self.config.min_kept_fraction
        )
        for name, mask in masks.items():
            self.layers[name].set_mask(mask)
        self.broadcast_masks()
        self.last_pruned_step = step
        self.current_target = target
        self.model._prune_trainer_target = target

    def broadcast_masks(self) -> None:
        """Under torch.distributed, copy rank 0's masks to every rank (and re-zero weights)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        for layer in self.layers.values():
            buf = layer.weight_mask.to(torch.uint8)
            dist.broadcast(buf, src=0)
            layer.weight_mask.copy_(buf.bool())
            layer.apply_mask()

    def sparsity(self) -> tuple[float, dict[str, float]]:
        """Current (global, per-layer) mask sparsity."""
        return mask_sparsity(self.layers)

    # ---- Trainer events ---------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.schedule = self.config.schedule.resolve(state.max_steps)
        if state.global_step > 0:
            self._load_checkpoint_state(os.path.join(args.output_dir, f"checkpoint-{state.global_step}"))
        self.model._prune_trainer_target = self.current_target

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        step = state.global_step
        if step != self.last_pruned_step and self.schedule.is_pruning_step(step):
            self.update_masks(step, args=args, state=state, **kwargs)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        for layer in self.layers.values():
            layer.mask_grad()

    def on_optimizer_step(self, args, state, control, **kwargs):
        for layer in self.layers.values():
            layer.apply_mask()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # A schedule ending at the last step: apply the final target once training stops.
        final = self.schedule.target(state.global_step)
        if final > self.current_target + 1e-12 and state.global_step != self.last_pruned_step:
            self.update_masks(state.global_step, args=args, state=state, **kwargs)

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(ckpt) and state.is_world_process_zero:
            with open(os.path.join(ckpt, STATE_FILE), "w") as f:
                json.dump(self.state_dict(), f, indent=2)

    # ---- checkpoint state -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.method_name,
            "config": self.config.to_dict(),
            "last_pruned_step": self.last_pruned_step,
            "current_target": self.current_target,
            "pruning_time_s": self.pruning_time_s,
            "pruning_steps": self.pruning_steps,
            "method_state": self.method_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("method") != self.method_name:
            raise ValueError(
                f"checkpoint pruning state is for method {state.get('method')!r}, not {self.method_name!r}"
            )
        self.last_pruned_step = int(state["last_pruned_step"])
        self.current_target = float(state["current_target"])
        self.pruning_time_s = float(state.get("pruning_time_s", 0.0))  # absent in older checkpoints
        self.pruning_steps = int(state.get("pruning_steps", 0))
        self.load_method_state(state.get("method_state", {}))

    def _load_checkpoint_state(self, ckpt_dir: str) -> None:
        path = os.path.join(ckpt_dir, STATE_FILE)
        if os.path.isfile(path):
            with open(path) as f:
                self.load_state_dict(json.load(f))
