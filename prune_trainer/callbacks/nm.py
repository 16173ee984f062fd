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
from typing import Any

import torch
from torch import nn
from transformers import TrainerControl, TrainerState, TrainingArguments

from prune_trainer.callbacks.base import PruningCallback
from prune_trainer.config import PruningConfig
from prune_trainer.masking.inject import find_target_linears, masked_layers
from prune_trainer.masking.selection import nm_mask, parse_pattern
from prune_trainer.methods.nm_scores import (
    NM_SCORES,
    calibration_batches,
    collect_input_norms,
    magnitude_nm_scores,
    movement_nm_scores,
    obert_nm_masks,
    sparsegpt_nm_masks,
    wanda_nm_scores,
)
from prune_trainer.methods.obert import GradientSampler
from prune_trainer.schedules.schedule import PruningSchedule

DENSE_FILE = "nm_dense_weights.pt"
DYNAMIC_MODES = (None, "srste")
DEFAULT_METHOD_KWARGS: dict[str, Any] = {
    "score": "magnitude",  # magnitude | wanda | movement | obert | sparsegpt
    "calib_batches": 8,  # batches: Wanda's input norms, SparseGPT's Hessian; gradients (m) of oBERT's Fisher
    "calib_batch_size": None,  # default: the Trainer's batch size
    "block_size": 16,  # oBERT Fisher block size B (multiple of M, divides in_features)
    "damp": 1e-7,  # oBERT dampening λ of F = λI + (1/m) Σ g gᵀ
    "obs_update": True,  # oBERT: apply the joint OBS weight update with the mask
    "dynamic": None,  # None (static, ASP) | "srste"
    "srste_decay": 2e-4,  # λ_W of SR-STE
    "mask_update_frequency": 1,  # SR-STE: recompute the mask every that many steps
    "freeze_step": 1.0,  # SR-STE: fix the mask from this step on (int step or fraction of training)
    "on_incompatible": "error",  # layers whose in_features is not a multiple of M: error | skip (left dense)
    "seed": 0,
}


def _resolve_step(value: int | float, max_steps: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be a non-negative int step or a fraction in [0, 1], got {value!r}")
    if isinstance(value, float):
        if value > 1:
            raise ValueError(f"{name} as a float is a fraction of training and must be ≤ 1, got {value!r}")
        return int(round(value * max_steps))
    return int(value)


class NMSparsityCallback(PruningCallback):
    """N:M mask-aware fine-tuning (ASP-style fixed mask, or SR-STE dynamic masks).

    The pattern comes from ``schedule.pattern`` (``"unstructured"`` is read as ``"2:4"``), the mask time from
    ``schedule.start_step`` (0 = at the start, else after a dense warm-up); ``kind`` must be ``oneshot`` or
    ``constant``. Options (``config.method_kwargs``): see ``DEFAULT_METHOD_KWARGS``.

    Example::

        config = PruningConfig(
            method="nm", schedule=PruningSchedule(kind="oneshot", start_step=0, pattern="2:4"),
            method_kwargs={"score": "wanda", "calib_batches": 16},
        )
        cb = NMSparsityCallback(model, config)
        Trainer(model=model, args=args, ..., callbacks=[cb, SparsityLoggingCallback(model)])
    """

    method_name = "nm"
    monotone = False

    def __init__(self, model: nn.Module, config: PruningConfig | None = None, **schedule_overrides: Any) -> None:
        if config is None:
            config = PruningConfig(method=self.method_name, schedule=PruningSchedule(kind="oneshot"))
        config = dataclasses.replace(config)
        sched = {**config.schedule.to_dict(), **schedule_overrides}
        if sched["pattern"] in (None, "unstructured"):
            sched["pattern"] = "2:4"
        n, m = parse_pattern(sched["pattern"])
        if sched["kind"] not in ("oneshot", "constant"):
            raise ValueError(
                f"N:M masks are computed once (ASP) or by SR-STE: schedule kind must be 'oneshot' or 'constant', "
                f"got {sched['kind']!r}"
            )
        sched.update(initial_sparsity=0.0, final_sparsity=1.0 - n / m, scope="layer", end_step=None)
        config.schedule = PruningSchedule.from_dict(sched)
        unknown = set(config.method_kwargs) - set(DEFAULT_METHOD_KWARGS)
        if unknown:
            raise ValueError(f"unknown nm method_kwargs {sorted(unknown)}; allowed: {sorted(DEFAULT_METHOD_KWARGS)}")
        opts = {**DEFAULT_METHOD_KWARGS, **config.method_kwargs}
        if opts["score"] not in NM_SCORES:
            raise ValueError(f"unknown N:M score {opts['score']!r}; choose one of {NM_SCORES}")
        if opts["dynamic"] not in DYNAMIC_MODES:
            raise ValueError(f"unknown dynamic mode {opts['dynamic']!r}; choose one of {DYNAMIC_MODES}")
        if opts["dynamic"] and opts["score"] in ("obert", "sparsegpt"):
            raise ValueError(
                f"score {opts['score']!r} (one-shot mask with weight update) cannot be combined with dynamic='srste'"
            )
        if opts["on_incompatible"] not in ("error", "skip"):
            raise ValueError(f"on_incompatible must be 'error' or 'skip', got {opts['on_incompatible']!r}")
        if opts["score"] == "obert" and opts["block_size"] % m:
            raise ValueError(f"oBERT block_size {opts['block_size']} must be a multiple of M={m}")
        if not isinstance(opts["mask_update_frequency"], int) or opts["mask_update_frequency"] < 1:
            raise ValueError(f"mask_update_frequency must be a positive int, got {opts['mask_update_frequency']!r}")
        self.n, self.m = n, m
        self.opts = opts

        # Shape validation before the model is touched: layers whose in_features is not a multiple of M.
        existing = masked_layers(model)
        candidates = existing or {
            name: model.get_submodule(name) for name in find_target_linears(model, config.targets, config.exclude)
        }
        bad = {name: layer.in_features for name, layer in candidates.items() if layer.in_features % m}
        if bad and opts["on_incompatible"] == "error":
            raise ValueError(
                f"N:M pattern {n}:{m} needs in_features divisible by {m}; incompatible layers (in_features): {bad}. "
                "Exclude them or set method_kwargs.on_incompatible: skip to leave them dense."
            )
        if bad:  # skip: leave them plain dense nn.Linear (not wrapped), listed in skipped_layers
            config.exclude = [*config.exclude, *(f"^{re.escape(name)}$" for name in sorted(bad))]
        super().__init__(model, config)
        self.skipped_layers = sorted(bad)
        self.dense: dict[str, torch.Tensor] | None = None
        self.frozen = False
        self.mask_step = -1
        self.freeze_step: int | None = None
        self._input_norms: dict[str, torch.Tensor] | None = None

    # ---- masks ------------------------------------------------------------------------------------------
    @property
    def dynamic(self) -> bool:
        return self.opts["dynamic"] == "srste"

    def _calibration(self, kwargs: dict[str, Any]):
        return calibration_batches(
            kwargs.get("train_dataloader"), self.opts["calib_batches"], self.opts["calib_batch_size"], self.opts["seed"]
        )

    def compute_scores(self, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Per-weight scores for the first-order options (magnitude, wanda, movement)."""
        score = self.opts["score"]
        if score == "magnitude":
            return magnitude_nm_scores(self.layers)
        if score == "movement":
            return movement_nm_scores(self.layers)
        if score == "wanda":
            if self._input_norms is None:
                self._input_norms = collect_input_norms(self.model, self.layers, self._calibration(kwargs))
            return wanda_nm_scores(self.layers, self._input_norms)
        raise ValueError(f"score {score!r} gives masks, not per-weight scores")

    @torch.no_grad()
    def compute_masks(self, **kwargs: Any) -> dict[str, torch.Tensor]:
        """N:M keep-masks per layer; with ``score`` 'obert' or 'sparsegpt' the weights are updated too."""
        if self.opts["score"] == "sparsegpt":
            return sparsegpt_nm_masks(
                self.model, self.layers, self._calibration(kwargs), self.n, self.m, self.config.targets,
                self.config.exclude,
            )
        if self.opts["score"] != "obert":
            return {name: nm_mask(s, self.n, self.m) for name, s in self.compute_scores(**kwargs).items()}
        sampler = GradientSampler.from_trainer(
            kwargs.get("args"), kwargs.get("train_dataloader"), self.opts["calib_batch_size"], self.opts["seed"]
        )
        masks = obert_nm_masks(
            self.model, self.layers, sampler, self.opts["calib_batches"], self.opts["block_size"], self.n, self.m,
            damp=self.opts["damp"], update=self.opts["obs_update"],
        )
        return masks

    @torch.no_grad()
    def update_masks(self, step: int, **kwargs: Any) -> None:
        """Compute N:M masks from the chosen score and apply them (zeroing pruned weights)."""
        for name, mask in self.compute_masks(**kwargs).items():
            self.layers[name].set_mask(mask)
        self.broadcast_masks()
        self.last_pruned_step = step
        self.mask_step = step
        self.current_target = 1.0 - self.n / self.m
        self.model._prune_trainer_target = self.current_target

    # ---- Trainer events -------------------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        self.freeze_step = _resolve_step(self.opts["freeze_step"], state.max_steps, "freeze_step")
        if self.dynamic and self.last_pruned_step >= 0 and not self.frozen and self.dense is None:
            path = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", DENSE_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"resuming SR-STE needs the dense weights saved at {path}")
            saved = torch.load(path, map_location="cpu", weights_only=True)
            self.dense = {n: saved[n].to(self.layers[n].weight.device) for n in self.layers}

    def on_step_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        step = state.global_step
        if self.last_pruned_step < 0 and step >= int(self.schedule.start_step):
            if self.dynamic and step < (self.freeze_step or 0):
                self.dense = {n: layer.weight.detach().clone() for n, layer in self.layers.items()}
            else:
                self.frozen = True
            self.update_masks(step, args=args, state=state, **kwargs)

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.dense is None:
            return super().on_pre_optimizer_step(args, state, control, **kwargs)
        # SR-STE: the gradient of the sparse forward flows to every weight (straight-through), plus the decay
        # λ_W (¬M) ⊙ W of the pruned ones; the optimizer then steps the dense weights.
        decay = float(self.opts["srste_decay"])
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
        if freeze or (next_step - self.mask_step) >= self.opts["mask_update_frequency"]:
            self.update_masks(next_step, args=args, state=state, **kwargs)  # W ← W_dense ⊙ M_new
        else:
            for layer in self.layers.values():
                layer.apply_mask()
        if freeze:
            self.dense = None
            self.frozen = True

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        super().on_save(args, state, control, **kwargs)
        ckpt = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if self.dense is not None and os.path.isdir(ckpt) and state.is_world_process_zero:
            torch.save({n: t.cpu() for n, t in self.dense.items()}, os.path.join(ckpt, DENSE_FILE))

    # ---- state --------------------------------------------------------------------------------------------
    def method_state(self) -> dict[str, Any]:
        return {
            "pattern": f"{self.n}:{self.m}",
            "options": self.opts,
            "skipped_layers": self.skipped_layers,
            "mask_step": self.mask_step,
            "frozen": self.frozen,
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.mask_step = int(state.get("mask_step", -1))
        self.frozen = bool(state.get("frozen", False))

    def export_info(self) -> dict[str, Any]:
        """What the sparsity report should add for this run: pattern, score, and layers left dense."""
        return {
            "pattern": f"{self.n}:{self.m}",
            "score": self.opts["score"],
            "dynamic": self.opts["dynamic"],
            "skipped_layers": self.skipped_layers,
        }
