"""`MovementPruningCallback`: hard and soft movement pruning with a plain `Trainer`.

Math in `prune_trainer.methods.movement` (Sanh et al. 2020). What the callback arranges:

- **Layers**: the target Linears become `MaskedLinear` with score Parameters ``S`` (constant
  ``score_init``; forward ``y = x (W ⊙ STE(S, M))ᵀ + b``). Masks ``M(S)`` are recomputed from the scores after
  every optimizer step (and at train begin), so every forward, eval included, uses the mask of the
  current scores. Pruned weights are not zeroed during training (a weight can come back).
- **Schedule** (`PruningSchedule`, independent of the LR warm-up): before ``start_step`` (initial
  warm-up) nothing is pruned but the scores already train; from ``start_step`` to ``end_step`` the
  target follows the cubic schedule; after ``end_step`` (final warm-up) it stays at the final value.
  Hard: keep the top ``(1 - s_t)`` scores. Soft: the sigmoid threshold and the penalty weight ramp
  with the schedule's progress ``p_t = (s_t - s_i) / (s_f - s_i)``: ``τ_t = p_t τ_f``,
  ``λ_t = p_t λ_f`` (as the reference's ``regu_lambda = final_lambda · threshold / final_threshold``).
- **Loss**: soft adds ``λ_t · mean_l mean(σ(S_l))`` to ``outputs.loss`` through a forward hook on the
  model, in training mode only (the Trainer backpropagates ``outputs.loss``; no Trainer subclass).
- **Optimizer**: the scores get their own parameter group (``lr = score_lr``, ``weight_decay = 0``)
  in the optimizer the Trainer built. The scores are frozen (``requires_grad=False``) until
  ``on_train_begin``, so the Trainer's own groups never contain them; ``on_train_begin`` then adds the
  group, and appends ``score_lr`` / group 0's multiplier to the Trainer's ``LambdaLR`` (``base_lrs``,
  ``lr_lambdas``), so the Trainer's warm-up and decay apply to the scores: ``lr_S(t) = score_lr · λ(t)``.
  Under DDP the score gradients are averaged over ranks at the end of the backward pass of the last
  micro-batch of each optimizer step (DDP's reducer does not know the scores), before the Trainer clips the
  gradient norm over all parameters, so every rank clips alike and keeps identical weights and scores.
  Resume: the optimizer's ``state_dict`` (what the Trainer saves) leaves the score group out, so
  ``optimizer.pt`` matches the layout the Trainer builds and loads before ``on_train_begin``; the
  score group's Adam state is saved next to it (``movement_optimizer.pt``) and restored here.
- **End**: ``on_train_end`` freezes the masks (pruned weights zeroed) and drops the scores; the model
  then exports (`export_pruned_model`) as a plain BERT with zeros.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import TrainerControl, TrainerState, TrainingArguments

from prune_trainer.callbacks.base import MethodNeeds, PruningCallback, PruningContext, checkpoint_dir, is_distributed
from prune_trainer.config import PruningConfig
from prune_trainer.io import atomic_file
from prune_trainer.methods.movement import hard_movement_masks, sigmoid_l1_penalty, soft_movement_masks
from prune_trainer.options import Options

SCORE_OPTIMIZER_FILE = "movement_optimizer.pt"
SCORE_GROUP_KEY = "prune_trainer_movement_scores"


@dataclass
class MovementOptions(Options):
    """Movement pruning options (Sanh et al. 2020).

    ``variant``: ``"hard"`` (top-k of scores, exact scheduled sparsity) or ``"soft"`` (threshold + penalty;
    the reached sparsity is set by ``final_lambda`` and logged). ``score_lr``: learning rate of the scores
    (their weight decay is 0). ``score_init``: constant initial score. ``final_threshold``: soft only, final
    sigmoid threshold ``τ_f`` (``σ(S) > τ`` keeps a weight). ``final_lambda``: soft only, final penalty ``λ_f``.
    """

    section = "movement options"

    variant: Literal["hard", "soft"] = "hard"
    score_lr: float = 1e-2
    score_init: float = 0.0
    final_threshold: float = 0.1
    final_lambda: float = 0.0

    def validate(self) -> None:
        if not self.score_lr > 0:
            raise ValueError(f"movement score_lr must be > 0, got {self.score_lr!r}")
        if not 0.0 < self.final_threshold < 1.0:
            raise ValueError(
                f"movement final_threshold (a sigmoid value) must be in (0, 1), got {self.final_threshold!r}"
            )
        if self.final_lambda < 0:
            raise ValueError(f"movement final_lambda must be ≥ 0, got {self.final_lambda!r}")


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The innermost `torch.optim.Optimizer` (accelerate's ``AcceleratedOptimizer`` wraps one)."""
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch optimizer, got {type(optimizer).__name__}")
    return optimizer


def register_score_grad_averaging(pruner: MovementPruningCallback) -> list[Any]:
    """Under torch.distributed: hooks that run ``pruner.average_score_grads()`` once per optimizer step, at the end
    of the backward pass of its last micro-batch (accelerate's ``sync_gradients``, set by the Trainer per
    micro-batch), i.e. after gradient accumulation and before the Trainer's gradient clipping. Returns the handles.

    A post-accumulate-grad hook on each score queues the averaging as an autograd-engine callback (as DDP's
    reducer does) once per backward pass (keyed by its graph-task id), so it runs after every score gradient of
    that backward pass has been accumulated.
    """
    if not is_distributed():
        return []
    from accelerate.state import GradientState

    gradient_state = GradientState()
    queued_for = [-1]  # graph task of the backward pass the averaging is queued for

    def hook(_param: torch.Tensor) -> None:
        task = torch._C._current_graph_task_id()
        if gradient_state.sync_gradients and queued_for[0] != task:
            queued_for[0] = task
            torch.autograd.Variable._execution_engine.queue_callback(pruner.average_score_grads)

    return [p.register_post_accumulate_grad_hook(hook) for p in pruner.score_params()]


class TrainableScoresMixin:
    """Training of mask scores next to the weights, shared by the methods whose masks are functions of
    trainable scores (movement pruning of weights, `MovementPruningCallback`, and of groups,
    `prune_trainer.callbacks.structured_movement`): the scores' own optimizer group and LR schedule, the soft
    variant's penalty in the loss, DDP averaging of the score gradients, their optimizer state in checkpoints.

    A class using it is also a `PruningCallback` (listed after the mixin) and provides ``score_params()`` (the
    score Parameters, frozen until ``on_train_begin``) and ``freeze_masks()`` (bake the masks in, drop the scores);
    it calls `init_score_training` from its ``__init__``.
    """

    def init_score_training(self, opts: Any) -> None:
        """Read ``variant``, ``score_lr``, ``final_threshold``, ``final_lambda`` from the options."""
        self.variant = opts.variant
        self.score_lr = opts.score_lr
        self.final_threshold = opts.final_threshold
        self.final_lambda = opts.final_lambda
        self.current_threshold = 0.0
        self.current_lambda = 0.0
        self.last_penalty: float | None = None
        self.finalized = False
        self._optimizer: torch.optim.Optimizer | None = None
        self._hooks: list[Any] = []

    def score_params(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def freeze_masks(self) -> None:
        raise NotImplementedError

    def progress(self, step: int) -> float:
        """Schedule progress ``p_t = (s_t - s_i) / (s_f - s_i)`` in [0, 1] (1 once past the start if s_f = s_i)."""
        target = self.schedule.target(step)
        span = self.schedule.final_sparsity - self.schedule.initial_sparsity
        if span <= 0:
            return 1.0 if step >= int(self.schedule.start_step) else 0.0
        return min(1.0, max(0.0, (target - self.schedule.initial_sparsity) / span))

    def average_score_grads(self) -> None:
        """Under torch.distributed, replace each score gradient by its mean over ranks (one all-reduce).

        The scores are frozen when the Trainer wraps the model in DDP, so DDP's reducer does not average their
        gradients; without this every rank's scores would follow only its own data shard.
        """
        if not is_distributed():
            return
        world = torch.distributed.get_world_size()
        grads = [p.grad for p in self.score_params() if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def penalty(self) -> torch.Tensor:
        """``λ_t · mean_l mean(σ(S_l))`` (soft; 0 for hard or before pruning starts)."""
        scores = self.score_params()
        if self.variant != "soft" or self.current_lambda == 0.0 or not scores:
            return torch.zeros(())
        return self.current_lambda * sigmoid_l1_penalty(scores)

    @torch.no_grad()
    def finalize(self) -> None:
        """Freeze the masks (`freeze_masks`: pruned weights zeroed, scores dropped), remove hooks (idempotent)."""
        self.freeze_masks()
        self._detach_from_optimizer()
        self._remove_hooks()
        self.finalized = True

    # ---- optimizer plumbing ------------------------------------------------------------------
    def _attach_to_optimizer(self, optimizer: Any) -> torch.optim.Optimizer:
        """Move the scores (wherever they are) into one group ``{lr: score_lr, weight_decay: 0}``."""
        opt = unwrap_optimizer(optimizer)
        scores = self.score_params()
        ids = {id(p) for p in scores}
        for group in opt.param_groups:
            if group.get(SCORE_GROUP_KEY):
                group["params"] = list(scores)
                break
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        else:
            opt.add_param_group(
                {"params": list(scores), "lr": self.score_lr, "weight_decay": 0.0, SCORE_GROUP_KEY: True}
            )
        if self._optimizer is not opt:
            opt.register_state_dict_post_hook(_drop_score_group_from_state_dict)
            self._optimizer = opt
        return opt

    def _score_group(self) -> dict[str, Any] | None:
        if self._optimizer is None:
            return None
        return next((g for g in self._optimizer.param_groups if g.get(SCORE_GROUP_KEY)), None)

    def _detach_from_optimizer(self) -> None:
        group = self._score_group()
        if group is not None:
            for p in group["params"]:
                self._optimizer.state.pop(p, None)
            group["params"] = []

    def _attach_to_scheduler(self, lr_scheduler: Any) -> None:
        """Make the Trainer's ``LambdaLR`` drive the score group: ``lr_S(t) = score_lr · λ_0(t)``.

        Appends ``score_lr`` to ``base_lrs`` and group 0's multiplier to ``lr_lambdas`` (wrapped in a
        plain function, which ``LambdaLR.state_dict`` stores as None, so the saved scheduler state
        loads into the scheduler the Trainer builds on resume, before this callback runs).
        """
        sched = lr_scheduler
        while not isinstance(sched, torch.optim.lr_scheduler.LRScheduler) and hasattr(sched, "scheduler"):
            sched = sched.scheduler
        if not isinstance(sched, torch.optim.lr_scheduler.LambdaLR):
            raise TypeError(
                f"movement pruning drives the score LR through the Trainer's LambdaLR; got {type(sched).__name__} "
                "(use an lr_scheduler_type built on LambdaLR: linear, cosine, constant, ...)"
            )
        n_groups = len(self._optimizer.param_groups)
        base_fn = sched.lr_lambdas[0]

        def score_multiplier(step: int) -> float:
            return base_fn(step)

        del sched.base_lrs[n_groups:], sched.lr_lambdas[n_groups:]
        while len(sched.base_lrs) < n_groups:
            sched.base_lrs.append(self.score_lr)
        while len(sched.lr_lambdas) < n_groups:
            sched.lr_lambdas.append(score_multiplier)
        group = self._score_group()
        group["initial_lr"] = self.score_lr
        group["lr"] = self.score_lr * base_fn(sched.last_epoch)
        sched._last_lr = [g["lr"] for g in self._optimizer.param_groups]

    def _save_score_optimizer(self, ckpt_dir: str) -> None:
        group = self._score_group()
        if group is None:
            return
        state = [self._optimizer.state.get(p, {}) for p in group["params"]]
        hyper = {k: v for k, v in group.items() if k != "params"}
        saved = {"group": hyper, "state": state, "layers": list(self.layers)}
        path = os.path.join(ckpt_dir, SCORE_OPTIMIZER_FILE)
        with atomic_file(path) as tmp:  # complete or absent
            torch.save(saved, tmp)

    def _load_score_optimizer(self, ckpt_dir: str) -> None:
        path = os.path.join(ckpt_dir, SCORE_OPTIMIZER_FILE)
        group = self._score_group()
        if group is None or not os.path.isfile(path):
            return
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved["layers"] != list(self.layers) or len(saved["state"]) != len(group["params"]):
            raise ValueError(f"{path} was saved for other layers than this model's movement layers")
        group.update({k: v for k, v in saved["group"].items() if k != "params"})
        for p, st in zip(group["params"], saved["state"], strict=True):
            self._optimizer.state[p] = {
                k: (v if k == "step" or not torch.is_tensor(v) else v.to(device=p.device, dtype=p.dtype))
                for k, v in st.items()
            }

    # ---- loss hook ---------------------------------------------------------------------------
    def _loss_hook(self, module: nn.Module, args: Any, output: Any) -> Any:
        if not module.training or self.variant != "soft" or self.current_lambda == 0.0:
            return None
        loss = output["loss"] if isinstance(output, dict) else (output[0] if isinstance(output, tuple) else None)
        if loss is None:
            return None
        penalty = self.penalty().to(loss.device)
        self.last_penalty = float(penalty.detach())
        if isinstance(output, dict):
            output["loss"] = loss + penalty
            return output
        return (loss + penalty, *output[1:])

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ---- Trainer events ----------------------------------------------------------------------
    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        if self.finalized:
            raise RuntimeError(f"this {type(self).__name__} was finalized (scores dropped); create a new one")
        super().on_train_begin(args, state, control, **kwargs)  # resume state, then masks from the scores
        for p in self.score_params():
            p.requires_grad_(True)
        optimizer = kwargs.get("optimizer")
        if optimizer is None:
            raise RuntimeError(f"{type(self).__name__} needs the Trainer's optimizer at on_train_begin")
        self._attach_to_optimizer(optimizer)
        self._attach_to_scheduler(kwargs.get("lr_scheduler"))
        if state.global_step > 0:
            self._load_score_optimizer(checkpoint_dir(args, state))
        if not self._hooks:
            self._hooks.append(self.model.register_forward_hook(self._loss_hook))
            self._hooks.extend(register_score_grad_averaging(self))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and not any(k.startswith("eval_") for k in logs) and self.variant == "soft":
            logs.update({"movement/threshold": self.current_threshold, "movement/lambda": self.current_lambda})
            if self.last_penalty is not None:
                logs["movement/penalty"] = self.last_penalty

    def on_save(self, args, state, control, **kwargs):
        super().on_save(args, state, control, **kwargs)
        ckpt = checkpoint_dir(args, state)
        if os.path.isdir(ckpt) and state.is_world_process_zero:
            self._save_score_optimizer(ckpt)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self.prune(state.global_step, PruningContext.from_event(args, state, **kwargs))
        self.finalize()

    # ---- checkpoint state --------------------------------------------------------------------
    def method_state(self) -> dict[str, Any]:
        return {
            "variant": self.variant,
            "current_threshold": self.current_threshold,
            "current_lambda": self.current_lambda,
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        if state.get("variant", self.variant) != self.variant:
            raise ValueError(f"checkpoint is for movement variant {state['variant']!r}, not {self.variant!r}")
        self.current_threshold = float(state.get("current_threshold", 0.0))
        self.current_lambda = float(state.get("current_lambda", 0.0))




class MovementPruningCallback(TrainableScoresMixin, PruningCallback):
    """Hard or soft movement pruning as a Trainer callback (options: `MovementOptions`).

    Example::

        pruner = MovementPruningCallback(model, variant="hard", final_sparsity=0.9, start_step=0.1,
                                         end_step=0.7, frequency=1, scope="layer")
        Trainer(model=model, args=args, ..., callbacks=[pruner]).train()
    """

    method_name = "movement"
    options_class = MovementOptions
    needs = MethodNeeds(mask_in_forward=True, keeps_zeros=False, monotone=False, when="every_step")

    def __init__(self, model: nn.Module, config: PruningConfig | None = None, **overrides: Any) -> None:
        super().__init__(model, config, **overrides)
        opts: MovementOptions = self.options
        self.init_score_training(opts)
        for layer in self.layers.values():
            # Frozen until on_train_begin so that the Trainer's own param groups never hold them.
            layer.attach_scores(opts.score_init, requires_grad=False)

    def prepare_config(self, config: PruningConfig, model: nn.Module) -> PruningConfig:
        if config.nm is not None:
            raise ValueError(f"movement pruning is unstructured; got pattern {config.pattern!r}")
        return config

    # ---- scores and masks ------------------------------------------------------------------
    def score_params(self) -> list[nn.Parameter]:
        """The score Parameters, in layer order (empty once finalized)."""
        return [layer.mask_scores for layer in self.layers.values() if layer.mask_scores is not None]

    def scores(self) -> dict[str, torch.Tensor]:
        """The current scores by layer (detached; empty once finalized)."""
        layers = self.layers.items()
        return {name: layer.mask_scores.detach() for name, layer in layers if layer.mask_scores is not None}

    def compute_masks(self, step: int, target: float, context: PruningContext) -> dict[str, torch.Tensor]:
        """Masks from the current scores for the schedule at ``step`` (weights are not zeroed)."""
        scores = self.scores()
        if not scores:
            return {}
        if self.variant == "hard":
            return hard_movement_masks(scores, target, self.config.scope, self.config.min_kept_fraction)
        p = self.progress(step)
        self.current_threshold = p * self.final_threshold
        self.current_lambda = p * self.final_lambda
        return soft_movement_masks(scores, self.current_threshold, self.config.min_kept_fraction)

    @torch.no_grad()
    def freeze_masks(self) -> None:
        """Zero the pruned weights and drop the scores."""
        for layer in self.layers.values():
            layer.freeze()


def _drop_score_group_from_state_dict(optimizer: torch.optim.Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    """Optimizer ``state_dict`` post-hook: leave out the score group (saved by the callback itself)."""
    groups = state_dict["param_groups"]
    drop = [i for i, g in enumerate(groups) if g.get(SCORE_GROUP_KEY)]
    if not drop:
        return state_dict
    dropped_ids = {pid for i in drop for pid in groups[i]["params"]}
    kept_groups = [g for i, g in enumerate(groups) if i not in drop]
    # Re-index the remaining params 0..n-1 in group order, as `Optimizer.state_dict` numbers them.
    remap: dict[int, int] = {}
    for g in kept_groups:
        for pid in g["params"]:
            remap[pid] = len(remap)
    state_dict["param_groups"] = [{**g, "params": [remap[p] for p in g["params"]]} for g in kept_groups]
    state_dict["state"] = {remap[k]: v for k, v in state_dict["state"].items() if k not in dropped_ids}
    return state_dict

