"""`PruningCallback`: the one contract every training-time pruning method implements.

A method is a subclass that sets ``method_name`` and ``options_class`` (a typed `Options` dataclass),
declares what it needs in ``needs`` (`MethodNeeds`) and implements one hook::

    def compute_masks(self, step: int, target: float, context: PruningContext) -> dict[str, Tensor]

returning a keep-mask per target layer for the scheduled sparsity ``target`` (it may update weights
inside, as oBERT's OBS update does; declare ``needs.updates_weights``). The base class owns the rest:

- wraps the target Linears in `MaskedLinear` when constructed (before the optimizer exists);
- **when**: at the schedule's pruning steps, before the step's forward (``needs.when="schedule"``), or
  after every optimizer step and at train begin (``"every_step"``, for masks that are functions of
  trainable scores, as movement pruning);
- **the pruning step** (`prune`): calls `compute_masks`, installs the masks, broadcasts masks (and
  weights when the method changes them) from rank 0 under DDP, times it (``pruning_time_s``,
  ``pruning_steps``), records ``last_pruned_step`` and ``current_target``;
- keeps pruned weights exactly zero (``needs.keeps_zeros``): gradients masked before every optimizer
  step, weights re-masked after it, so AdamW's decoupled weight decay and momentum cannot revive them;
- saves its state into each Trainer checkpoint (``pruning_state.json``: JSON, never pickle) and restores
  it on resume (a checkpoint without it is an error, not a silent restart of the bookkeeping).
Masks themselves are persistent buffers, saved and restored with the model weights.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from prune_trainer.config import PruningConfig
from prune_trainer.io import atomic_write_json
from prune_trainer.masking.inject import find_target_linears, in_features, inject_masked_layers
from prune_trainer.masking.masked_linear import MaskedLinear
from prune_trainer.masking.selection import check_nm, select_masks
from prune_trainer.masking.sparsity import mask_sparsity
from prune_trainer.options import Options
from prune_trainer.schedules.schedule import PruningSchedule

STATE_FILE = "pruning_state.json"


@dataclass(frozen=True)
class MethodNeeds:
    """What a method needs from the base class and the Trainer.

    ``mask_in_forward``: the forward multiplies ``W`` by ``M`` (masks that change while weights are kept).
    ``keeps_zeros``: pruned weights stay exactly zero through optimizer steps (gradient and weight masking).
    ``monotone``: already-pruned weights stay pruned (`select` ranks them last).
    ``updates_weights``: `compute_masks` changes weights (rank 0's are broadcast under DDP).
    ``calibration_data``: `compute_masks` reads ``context.train_dataloader`` (error when it is missing).
    ``when``: ``"schedule"`` (at the schedule's pruning steps) or ``"every_step"`` (after every optimizer step).
    """

    mask_in_forward: bool = False
    keeps_zeros: bool = True
    monotone: bool = True
    updates_weights: bool = False
    calibration_data: bool = False
    when: Literal["schedule", "every_step"] = "schedule"


@dataclass
class PruningContext:
    """What the Trainer passed with the event that triggered a pruning step (all optional outside a Trainer)."""

    args: TrainingArguments | None = None
    state: TrainerState | None = None
    train_dataloader: Any = None
    optimizer: Any = None
    lr_scheduler: Any = None

    @classmethod
    def from_event(cls, args: Any = None, state: Any = None, **kwargs: Any) -> PruningContext:
        return cls(args, state, kwargs.get("train_dataloader"), kwargs.get("optimizer"), kwargs.get("lr_scheduler"))


def is_distributed() -> bool:
    """Whether torch.distributed runs with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def checkpoint_dir(args: TrainingArguments, state: TrainerState) -> str:
    return os.path.join(args.output_dir, f"checkpoint-{state.global_step}")


class PruningCallback(TrainerCallback):
    """Base class of the pruning methods (see the module docstring for the contract).

    Args:
        model: the model that will be given to `Trainer` (wrapped in place here).
        config: a `PruningConfig` (default: this method's defaults).
        **overrides: schedule fields (``final_sparsity=0.9, end_step=0.7``), config fields
            (``scope="layer"``, ``pattern="2:4"``) or option fields of the method (``variant="soft"``).
    """

    method_name: ClassVar[str] = ""
    options_class: ClassVar[type[Options]] = Options
    needs: ClassVar[MethodNeeds] = MethodNeeds()

    def __init__(self, model: nn.Module, config: PruningConfig | None = None, **overrides: Any) -> None:
        config = config or self.default_config()
        if config.method != self.method_name:
            raise ValueError(
                f"{type(self).__name__} runs method {self.method_name!r}, got a config for {config.method!r}"
            )
        config = self.prepare_config(config.with_overrides(**overrides), model)
        self.config = config
        self.options = config.options
        self.model = model
        self.check_model(model)
        self.layers: dict[str, MaskedLinear] = inject_masked_layers(
            model, config.targets, config.exclude, mask_in_forward=self.needs.mask_in_forward
        )
        self.schedule: PruningSchedule = config.schedule
        self.last_pruned_step = -1
        self.current_target = 0.0
        self.pruning_time_s = 0.0
        """Wall seconds spent in pruning steps over the whole run (resumes included)."""
        self.pruning_steps = 0
        """Number of pruning steps over the whole run."""

    # ---- for methods to implement / refine --------------------------------------------------
    @classmethod
    def default_config(cls) -> PruningConfig:
        """The config used when none is given."""
        return PruningConfig(method=cls.method_name)

    def prepare_config(self, config: PruningConfig, model: nn.Module) -> PruningConfig:
        """Adjust or check the config before the model is touched (e.g. N:M fixes the target)."""
        return config

    def check_model(self, model: nn.Module) -> None:
        """Validate the target layers before the model is touched (default: N:M divides every input size)."""
        nm = self.config.nm
        if nm is not None:
            for name in find_target_linears(model, self.config.targets, self.config.exclude):
                check_nm(*nm, in_features(model.get_submodule(name)), name)

    def compute_masks(self, step: int, target: float, context: PruningContext) -> dict[str, torch.Tensor]:
        """Keep-masks ``{layer name: bool [out, in]}`` for sparsity ``target`` at optimizer step ``step``."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_masks")

    def should_prune(self, step: int) -> bool:
        """Whether ``step`` is a pruning step (default: the schedule's, once per step)."""
        return step != self.last_pruned_step and self.schedule.is_pruning_step(step)

    def method_state(self) -> dict[str, Any]:
        """Extra JSON-serialisable state to save in checkpoints."""
        return {}

    def load_method_state(self, state: dict[str, Any]) -> None:
        """Restore what `method_state` saved."""

    # ---- helpers for methods ----------------------------------------------------------------
    def select(self, scores: dict[str, torch.Tensor], target: float) -> dict[str, torch.Tensor]:
        """Masks from scores (higher = keep) with the config's scope, pattern and per-layer floor; with
        ``needs.monotone`` already-pruned weights rank last (they stay pruned)."""
        if self.needs.monotone:
            scores = {
                n: s.float().masked_fill(~self.layers[n].weight_mask.to(s.device), float("-inf"))
                for n, s in scores.items()
            }
        return select_masks(scores, target, self.config.scope, self.config.pattern, self.config.min_kept_fraction)

    # ---- the pruning step -------------------------------------------------------------------
    @torch.no_grad()
    def prune(self, step: int, context: PruningContext | None = None, target: float | None = None) -> None:
        """One pruning step: masks for ``target`` (default: the schedule's at ``step``) installed on every layer."""
        context = context or PruningContext()
        if self.needs.calibration_data and context.train_dataloader is None:
            raise ValueError(
                f"{self.method_name} pruning reads training batches at its pruning steps: run it inside a Trainer "
                "with a train_dataset (or give a PruningContext with a train_dataloader)"
            )
        target = self.schedule.target(step) if target is None else target
        start = time.perf_counter()
        masks = self.compute_masks(step, target, context)
        for name, mask in masks.items():
            layer = self.layers[name]
            if self.needs.keeps_zeros:
                layer.set_mask(mask)
            else:
                layer.weight_mask.copy_(mask.to(layer.weight_mask.device) != 0)
        self.broadcast(weights=self.needs.updates_weights)
        self.pruning_time_s += time.perf_counter() - start
        self.pruning_steps += 1
        self.last_pruned_step = step
        self.current_target = target

    def broadcast(self, weights: bool = False) -> None:
        """Under torch.distributed, make rank 0's masks (and weights if asked) every rank's, bitwise."""
        if not is_distributed():
            return
        for layer in self.layers.values():
            if weights:
                dist.broadcast(layer.weight.data, src=0)
            buf = layer.weight_mask.to(torch.uint8)
            dist.broadcast(buf, src=0)
            layer.weight_mask.copy_(buf.bool())
            if self.needs.keeps_zeros:
                layer.apply_mask()

    def sparsity(self) -> tuple[float, dict[str, float]]:
        """Current (global, per-layer) mask sparsity."""
        return mask_sparsity(self.layers)

    # ---- Trainer events ---------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if getattr(args, "load_best_model_at_end", False):
            raise ValueError(
                "load_best_model_at_end=True cannot be combined with pruning: the best checkpoint may come before "
                "the final sparsity; evaluate the final model instead"
            )
        self.schedule = self.config.schedule.resolve(state.max_steps)
        if state.global_step > 0:
            self._load_checkpoint_state(checkpoint_dir(args, state))
        if self.needs.when == "every_step":
            self.prune(state.global_step, PruningContext.from_event(args, state, **kwargs))

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.needs.when == "schedule" and self.should_prune(state.global_step):
            self.prune(state.global_step, PruningContext.from_event(args, state, **kwargs))

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.needs.when == "every_step":
            self.prune(state.global_step, PruningContext.from_event(args, state, **kwargs))

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.needs.keeps_zeros:
            for layer in self.layers.values():
                layer.mask_grad()

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.needs.keeps_zeros:
            for layer in self.layers.values():
                layer.apply_mask()

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        # A schedule ending at the last step (end_step=None): apply the final target once training stops.
        final = self.schedule.target(state.global_step)
        if final > self.current_target + 1e-12 and state.global_step != self.last_pruned_step:
            self.prune(state.global_step, PruningContext.from_event(args, state, **kwargs))

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        ckpt = checkpoint_dir(args, state)
        if os.path.isdir(ckpt) and state.is_world_process_zero:
            atomic_write_json(os.path.join(ckpt, STATE_FILE), self.state_dict())

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
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"resuming from {ckpt_dir}, which holds no {STATE_FILE}: it was not written by a run with this "
                "pruning callback (or was cut short); resume from a complete checkpoint or start over"
            )
        with open(path) as f:
            try:
                state = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is not valid JSON ({err}); the checkpoint is incomplete") from err
        self.load_state_dict(state)
