"""`NMSparsityCallback`: N:M (default 2:4) semi-structured sparsity during fine-tuning.

Static (NVIDIA ASP, Mishra et al. 2021): after an optional dense warm-up of ``schedule.start_step`` steps,
compute one N:M mask from the chosen score and keep it for the rest of training: gradients of pruned weights
are zeroed before each optimizer step and the weights re-masked after it (so AdamW cannot revive them).

Dynamic (SR-STE, Zhou et al. 2021, "Learning N:M Fine-grained Structured Sparse Neural Networks From Scratch"):
the forward uses the sparse ``W̃ = W ⊙ M``; the dense ``W`` is kept and updated with the straight-through
gradient plus a decay of the pruned weights, ``W ← W − γ (g(W̃) + λ_W (¬M) ⊙ W)``, and ``M`` is recomputed from
``|W|`` every ``mask_update_frequency`` steps until ``freeze_step``; from then on the mask is fixed as in the
static mode.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import TrainerControl, TrainerState, TrainingArguments

from prune_trainer.callbacks.base import MethodNeeds, PruningCallback, PruningContext, checkpoint_dir
from prune_trainer.config import PruningConfig
from prune_trainer.io import atomic_file
from prune_trainer.masking.inject import find_target_linears, in_features, masked_layers
from prune_trainer.masking.selection import nm_mask
from prune_trainer.methods.nm_scores import (
    calibration_batches,
    collect_input_norms,
    magnitude_nm_scores,
    movement_nm_scores,
    obert_nm_masks,
    sparsegpt_nm_masks,
    wanda_nm_scores,
)
from prune_trainer.methods.obert import GradientSampler
from prune_trainer.options import Options
from prune_trainer.schedules.schedule import PruningSchedule

DENSE_FILE = "nm_dense_weights.pt"


@dataclass
class NMOptions(Options):
    """N:M options.

    ``score``: how the mask is chosen: ``magnitude`` | ``wanda`` | ``movement`` (scores a movement callback
    left on the layers) | ``obert`` | ``sparsegpt`` (both update the kept weights). ``calib_batches``: batches
    for Wanda's input norms and SparseGPT's Hessian; the gradients (m) of oBERT's Fisher.
    ``calib_batch_size``: default the Trainer's batch size. ``block_size``, ``damp``, ``obs_update``: oBERT's
    Fisher block size B (a multiple of M dividing in_features), dampening λ and joint OBS weight update.
    ``dynamic``: None (static mask, ASP) or ``"srste"``; ``srste_decay`` λ_W, ``mask_update_frequency`` and
    ``freeze_step`` (int step or fraction of training) are SR-STE's. ``on_incompatible``: layers whose
    in_features is not a multiple of M: ``error`` or ``skip`` (left dense). ``seed``: calibration sample.
    """

    section = "nm options"

    score: Literal["magnitude", "wanda", "movement", "obert", "sparsegpt"] = "magnitude"
    calib_batches: int = 8
    calib_batch_size: int | None = None
    block_size: int = 16
    damp: float = 1e-7
    obs_update: bool = True
    dynamic: Literal["srste"] | None = None
    srste_decay: float = 2e-4
    mask_update_frequency: int = 1
    freeze_step: int | float = 1.0
    on_incompatible: Literal["error", "skip"] = "error"
    seed: int = 0

    def validate(self) -> None:
        if self.dynamic and self.score in ("obert", "sparsegpt"):
            raise ValueError(
                f"score {self.score!r} (one-shot mask with weight update) cannot be combined with dynamic='srste'"
            )
        if self.mask_update_frequency < 1:
            raise ValueError(f"mask_update_frequency must be a positive int, got {self.mask_update_frequency!r}")
        if self.calib_batches < 1:
            raise ValueError(f"calib_batches must be a positive int, got {self.calib_batches!r}")


def _resolve_step(value: int | float, max_steps: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int step or a fraction in [0, 1], got {value!r}")
    if isinstance(value, float):
        if value > 1:
            raise ValueError(f"{name} as a float is a fraction of training and must be ≤ 1, got {value!r}")
        return int(round(value * max_steps))
    return int(value)


class NMSparsityCallback(PruningCallback):
    """N:M mask-aware fine-tuning (ASP-style fixed mask, or SR-STE dynamic masks); options: `NMOptions`.

    The pattern comes from ``config.pattern`` (``"unstructured"`` is read as ``"2:4"``), the mask time from
    ``schedule.start_step`` (0 = at the start, else after a dense warm-up); ``kind`` must be ``oneshot`` or
    ``constant``.

    Example::

        config = PruningConfig(method="nm", pattern="2:4", schedule=PruningSchedule(kind="oneshot", start_step=0),
                               options=NMOptions(score="wanda", calib_batches=16))
        Trainer(model=model, args=args, ..., callbacks=[NMSparsityCallback(model, config)])
    """

    method_name = "nm"
    options_class = NMOptions
    needs = MethodNeeds(monotone=False)

    @classmethod
    def default_config(cls) -> PruningConfig:
        return PruningConfig(method=cls.method_name, pattern="2:4", schedule=PruningSchedule(kind="oneshot"))

    def __init__(self, model: nn.Module, config: PruningConfig | None = None, **overrides: Any) -> None:
        super().__init__(model, config, **overrides)
        self.n, self.m = self.config.nm
        self.dense: dict[str, torch.Tensor] | None = None
        self.frozen = False
        self.freeze_step: int | None = None
        self._input_norms: dict[str, torch.Tensor] | None = None

    def prepare_config(self, config: PruningConfig, model: nn.Module) -> PruningConfig:
        """Fix the schedule to the pattern's sparsity, per layer; leave incompatible layers dense if asked."""
        pattern = "2:4" if config.pattern == "unstructured" else config.pattern
        config = dataclasses.replace(config, pattern=pattern)
        n, m = config.nm
        opts: NMOptions = config.options
        if config.schedule.kind not in ("oneshot", "constant"):
            raise ValueError(
                f"N:M masks are computed once (ASP) or by SR-STE: schedule kind must be 'oneshot' or 'constant', "
                f"got {config.schedule.kind!r}"
            )
        if opts.score == "obert" and opts.block_size % m:
            raise ValueError(f"oBERT block_size {opts.block_size} must be a multiple of M={m}")
        schedule = config.schedule.replace(initial_sparsity=0.0, final_sparsity=1.0 - n / m, end_step=None)
        config = dataclasses.replace(config, schedule=schedule, scope="layer")
        # Shape validation before the model is touched: layers whose in_features is not a multiple of M.
        candidates = masked_layers(model) or {
            name: model.get_submodule(name) for name in find_target_linears(model, config.targets, config.exclude)
        }
        bad = {name: in_features(layer) for name, layer in candidates.items() if in_features(layer) % m}
        if bad and opts.on_incompatible == "error":
            raise ValueError(
                f"N:M pattern {n}:{m} needs in_features divisible by {m}; incompatible layers (in_features): {bad}. "
                "Exclude them or set options.on_incompatible: skip to leave them dense."
            )
        self.skipped_layers = sorted(bad)  # skip: left plain dense nn.Linear (not wrapped)
        if bad:
            config = dataclasses.replace(
                config, exclude=[*config.exclude, *(f"^{re.escape(name)}$" for name in sorted(bad))]
            )
        return config

    # ---- masks ------------------------------------------------------------------------------------------
    @property
    def dynamic(self) -> bool:
        return self.options.dynamic == "srste"

    def _calibration(self, context: PruningContext):
        return calibration_batches(
            context.train_dataloader, self.options.calib_batches, self.options.calib_batch_size, self.options.seed
        )

    def _scores(self, context: PruningContext) -> dict[str, torch.Tensor]:
        """Per-weight scores for the first-order options (magnitude, wanda, movement)."""
        score = self.options.score
        if score == "magnitude":
            return magnitude_nm_scores(self.layers)
        if score == "movement":
            return movement_nm_scores(self.layers)
        if self._input_norms is None:  # wanda
            self._input_norms = collect_input_norms(self.model, self.layers, self._calibration(context))
        return wanda_nm_scores(self.layers, self._input_norms)

    def should_prune(self, step: int) -> bool:
        """The first step at or after ``start_step`` (SR-STE re-masks from `on_optimizer_step`)."""
        return self.last_pruned_step < 0 and step >= int(self.schedule.start_step)

    @torch.no_grad()
    def compute_masks(self, step: int, target: float, context: PruningContext) -> dict[str, torch.Tensor]:
        """N:M keep-masks per layer; with ``score`` 'obert' or 'sparsegpt' the weights are updated too."""
        if self.last_pruned_step < 0:  # the first mask: SR-STE keeps the dense weights from here on
            if self.dynamic and step < (self.freeze_step or 0):
                self.dense = {n: layer.weight.detach().clone() for n, layer in self.layers.items()}
            else:
                self.frozen = True
        score = self.options.score
        if score in ("obert", "sparsegpt") and context.train_dataloader is None:
            raise ValueError(
                f"N:M score {score!r} reads training batches: run it inside a Trainer with a train_dataset"
            )
        if score == "sparsegpt":
            return sparsegpt_nm_masks(
                self.model, self.layers, self._calibration(context), self.n, self.m, self.config.targets,
                self.config.exclude,
            )
        if score == "obert":
            sampler = GradientSampler.from_trainer(
                context.args, context.train_dataloader, self.options.calib_batch_size, self.options.seed
            )
            return obert_nm_masks(
                self.model, self.layers, sampler, self.options.calib_batches, self.options.block_size, self.n,
                self.m, damp=self.options.damp, update=self.options.obs_update,
            )
        return {name: nm_mask(s, self.n, self.m) for name, s in self._scores(context).items()}

    # ---- Trainer events -------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self.freeze_step = _resolve_step(self.options.freeze_step, state.max_steps, "freeze_step")
        if self.dynamic and self.last_pruned_step >= 0 and not self.frozen and self.dense is None:
            path = os.path.join(checkpoint_dir(args, state), DENSE_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"resuming SR-STE needs the dense weights saved at {path}")
            saved = torch.load(path, map_location="cpu", weights_only=True)
            self.dense = {n: saved[n].to(self.layers[n].weight.device) for n in self.layers}

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.dense is None:
            return super().on_pre_optimizer_step(args, state, control, **kwargs)
        # SR-STE: the gradient of the sparse forward flows to every weight (straight-through), plus the decay
        # λ_W (¬M) ⊙ W of the pruned ones; the optimizer then steps the dense weights.
        decay = float(self.options.srste_decay)
        for name, layer in self.layers.items():
            dense = self.dense[name]
            if layer.weight.grad is not None and decay:
                layer.weight.grad.add_(dense * (~layer.weight_mask).to(dense.dtype), alpha=decay)
            layer.weight.copy_(dense)

    @torch.no_grad()
    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.dense is None:
            return super().on_optimizer_step(args, state, control, **kwargs)
        for name, layer in self.layers.items():
            self.dense[name].copy_(layer.weight)
        next_step = state.global_step + 1
        freeze = next_step >= (self.freeze_step if self.freeze_step is not None else state.max_steps)
        if freeze or (next_step - self.last_pruned_step) >= self.options.mask_update_frequency:
            self.prune(next_step, PruningContext.from_event(args, state, **kwargs))  # W ← W_dense ⊙ M_new
        else:
            for layer in self.layers.values():
                layer.apply_mask()
        if freeze:
            self.dense = None
            self.frozen = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        super().on_save(args, state, control, **kwargs)
        ckpt = checkpoint_dir(args, state)
        if self.dense is not None and os.path.isdir(ckpt) and state.is_world_process_zero:
            path = os.path.join(ckpt, DENSE_FILE)
            with atomic_file(path) as tmp:
                torch.save({n: t.cpu() for n, t in self.dense.items()}, tmp)

    # ---- state --------------------------------------------------------------------------------------------
    def method_state(self) -> dict[str, Any]:
        return {
            "pattern": f"{self.n}:{self.m}",
            "options": self.options.to_dict(),
            "skipped_layers": self.skipped_layers,
            "frozen": self.frozen,
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.frozen = bool(state.get("frozen", False))

    def export_info(self) -> dict[str, Any]:
        """What the sparsity report should add for this run: pattern, score, and layers left dense."""
        return {
            "pattern": f"{self.n}:{self.m}",
            "score": self.options.score,
            "dynamic": self.options.dynamic,
            "skipped_layers": self.skipped_layers,
        }
