"""`StructuredPruningCallback`: gradual removal of whole attention heads and FFN neurons on the schedule.

The groups are found from the model (`prune_trainer.structures`), scored and selected by
`prune_trainer.methods.structured`. ``compute_masks`` returns the element masks implied by the group masks, so
the base class keeps the removed weights exactly zero and handles DDP and resume unchanged; this class also
keeps the removed groups' biases (q/k/v, intermediate, gate/up rows) at exactly zero. The schedule's target is
the removed fraction of each kind's coupled weights. `prune_trainer.export.structured` then slices the removed
groups away for real.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from prune_trainer.callbacks.base import PruningCallback, PruningContext
from prune_trainer.config import PruningConfig
from prune_trainer.methods.structured import (
    check_group_sizes,
    gate_grads_columns,
    gate_grads_rows,
    magnitude_group_scores,
    select_groups,
    taylor_group_importance,
)
from prune_trainer.methods.taylor import accumulate
from prune_trainer.options import Options
from prune_trainer.structures import (
    STRUCTURE_KINDS,
    ModelStructures,
    bias_masks,
    element_masks,
    find_structures,
    kept_groups,
)


@dataclass
class GroupOptions(Options):
    """Options shared by the group-pruning methods. ``structures``: the kinds removed, ``"heads"`` (attention
    heads; KV groups under grouped-query attention) and/or ``"ffn"`` (FFN neurons). ``round_to_heads`` /
    ``round_to_ffn``: kept groups per layer are a multiple of it (or the whole layer). ``remove_sublayers``: a
    layer may lose all its heads (its attention sublayer) or all its FFN neurons (its FFN sublayer); off by
    default. ``min_heads``: head groups always kept in each layer (default 1, or 0 with ``remove_sublayers``;
    0 needs ``remove_sublayers``); without ``remove_sublayers`` each layer also keeps at least ``round_to_ffn``
    neurons."""

    section = "structured options"

    structures: list[str] = field(default_factory=lambda: list(STRUCTURE_KINDS))
    round_to_heads: int = 1
    round_to_ffn: int = 8
    min_heads: int | None = None
    remove_sublayers: bool = False

    def validate(self) -> None:
        if not self.structures or set(self.structures) - set(STRUCTURE_KINDS) or len(set(self.structures)) != len(
            self.structures
        ):
            raise ValueError(
                f"{self.section}: structures must be distinct values of {list(STRUCTURE_KINDS)}, "
                f"got {self.structures!r}"
            )
        if self.min_heads is not None and self.min_heads < (0 if self.remove_sublayers else 1):
            raise ValueError(
                f"{self.section}: min_heads must be >= 1 (removing every head of a layer needs "
                f"remove_sublayers: true, then min_heads >= 0), got {self.min_heads}"
            )
        for name in ("round_to_heads", "round_to_ffn"):
            if getattr(self, name) < 1:
                raise ValueError(f"{self.section}: {name} must be >= 1, got {getattr(self, name)}")

    def floors(self) -> dict[str, tuple[int, int]]:
        """``kind → (round_to, per-layer floor)``: the floor is 0 (a layer may be emptied) only with
        ``remove_sublayers``."""
        min_heads = self.min_heads if self.min_heads is not None else (0 if self.remove_sublayers else 1)
        return {
            "heads": (self.round_to_heads, min_heads),
            "ffn": (self.round_to_ffn, 0 if self.remove_sublayers else self.round_to_ffn),
        }


@dataclass
class StructuredOptions(GroupOptions):
    """`GroupOptions` plus the group score. ``score``: ``"magnitude"`` (group L2 norm), ``"taylor"`` (``Σ|g·w|``
    over the group, averaged over the steps since the last pruning step, or an EMA with ``ema``) or ``"fisher"``
    (``½ mean_n (Σ_S g_n·w)²`` over the training samples since the last pruning step, per-sample gradients from
    activation hooks; `prune_trainer.methods.structured`)."""

    section = "structured options"

    score: Literal["magnitude", "taylor", "fisher"] = "magnitude"
    ema: float | None = None

    def validate(self) -> None:
        super().validate()
        if self.ema is not None and not 0.0 <= self.ema < 1.0:
            raise ValueError(f"structured options: ema must be in [0, 1) or null, got {self.ema!r}")
        if self.ema is not None and self.score != "taylor":
            raise ValueError(f"structured options: ema applies to score 'taylor' only, got score {self.score!r}")


class GroupPruningCallback(PruningCallback):
    """Base of the methods that remove whole groups (`prune_trainer.structures`): finds the groups, checks the
    floors, turns group masks into element masks, and keeps the removed groups' biases at zero when the method
    keeps zeros. ``targets`` / ``exclude`` of the config are replaced by the coupled Linears of every layer;
    ``pattern`` must be unstructured."""

    options_class = GroupOptions

    def prepare_config(self, config: PruningConfig, model: nn.Module) -> PruningConfig:
        if config.nm is not None:
            raise ValueError(
                f"structured pruning removes whole groups: pattern must be unstructured, got {config.pattern!r}"
            )
        options: GroupOptions = config.options  # type: ignore[assignment]
        structures = find_structures(model, options.structures)
        floors = options.floors()
        for kind, groups in structures.groups.items():
            check_group_sizes(groups, *floors[kind], f"structured {kind}")
        self.structures: ModelStructures = structures
        self.floors = floors
        self._bias_keep: dict[str, torch.Tensor] | None = None
        return config.replace(targets=[f"^{re.escape(n)}$" for n in structures.linear_names()], exclude=[])

    def group_keep(self) -> dict[str, torch.Tensor]:
        """Current group mask of each kind (a group is kept while any of its weights is unmasked)."""
        return {
            kind: kept_groups(groups, {lin.name: self.layers[lin.name].weight_mask for lin in groups.linears})
            for kind, groups in self.structures.groups.items()
        }

    def select_keep(self, scores: dict[str, torch.Tensor], target: float) -> dict[str, torch.Tensor]:
        """Group masks keeping the best ``1 − target`` of each kind (scope, floors and rounding of the options);
        with ``needs.monotone`` removed groups stay removed."""
        current = self.group_keep() if self.needs.monotone else None
        return {
            kind: select_groups(
                groups, scores[kind], target, self.config.scope, *self.floors[kind],
                removed=~current[kind] if current is not None else None,
            )
            for kind, groups in self.structures.groups.items()
        }

    def element_masks(self, keep: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Element masks of every coupled Linear from the group masks."""
        masks: dict[str, torch.Tensor] = {}
        for kind, groups in self.structures.groups.items():
            shapes = {lin.name: self.layers[lin.name].weight.shape for lin in groups.linears}
            device = self.layers[groups.linears[0].name].weight.device
            masks.update(element_masks(groups, keep[kind].to(device), shapes))
        return masks

    @torch.no_grad()
    def prune(self, step: int, context: PruningContext | None = None, target: float | None = None) -> None:
        super().prune(step, context, target)
        self._bias_keep = None
        if self.needs.keeps_zeros:
            self.apply_bias_masks()

    def bias_keep(self) -> dict[str, torch.Tensor]:
        """Keep-mask of the biases owned by groups (from the current weight masks; cached until the next prune)."""
        if self._bias_keep is None:
            keep = self.group_keep()
            self._bias_keep = {}
            for kind, groups in self.structures.groups.items():
                self._bias_keep.update(bias_masks(groups, keep[kind]))
        return self._bias_keep

    @torch.no_grad()
    def apply_bias_masks(self, grads: bool = False) -> None:
        """Zero the removed groups' biases (or, with ``grads``, their gradients)."""
        for name, keep in self.bias_keep().items():
            bias = self.layers[name].bias
            target = None if bias is None else (bias.grad if grads else bias)
            if target is not None:
                target.masked_fill_(~keep.to(target.device), 0)

    def on_train_begin(self, args, state, control, **kwargs):
        self._bias_keep = None  # masks may just have been restored from a checkpoint
        super().on_train_begin(args, state, control, **kwargs)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        super().on_pre_optimizer_step(args, state, control, **kwargs)
        if self.needs.keeps_zeros:
            self.apply_bias_masks(grads=True)

    def on_optimizer_step(self, args, state, control, **kwargs):
        super().on_optimizer_step(args, state, control, **kwargs)
        if self.needs.keeps_zeros:
            self.apply_bias_masks()


class StructuredPruningCallback(GroupPruningCallback):
    """Remove the lowest-scoring attention heads and FFN neurons for the scheduled target.

    ``targets`` / ``exclude`` of the config are replaced by the coupled Linears of every layer; ``scope`` is
    ``"global"`` (groups of a kind compete across layers) or ``"layer"``; ``pattern`` must be unstructured.

    Example::

        pruner = StructuredPruningCallback(model, final_sparsity=0.5, end_step=0.7, frequency=100)
        Trainer(model=model, args=args, ..., callbacks=[pruner]).train()
        export_structured_model(model, "out/pruned", tokenizer)   # the smaller model
    """

    method_name = "structured"
    options_class = StructuredOptions

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.taylor_scores = {k: torch.zeros(g.num_groups) for k, g in self.structures.groups.items()}
        self.steps_seen = 0
        """Optimizer steps folded into ``taylor_scores`` since they were last reset."""
        self.fisher_sums = {k: torch.zeros(g.num_groups) for k, g in self.structures.groups.items()}
        """``Σ_n (∂L_n/∂m_g)²`` per group over the samples since the last pruning step (score ``fisher``)."""
        self.fisher_samples = 0
        self._pending: dict[str, torch.Tensor] = {}
        self._fisher_hooks: list[Any] = []

    def group_scores(self) -> dict[str, torch.Tensor]:
        """Score per group of each kind (higher = keep)."""
        if self.options.score == "taylor":
            return {k: s.clone() for k, s in self.taylor_scores.items()}
        if self.options.score == "fisher":
            self._flush_gate_grads()
            return {k: 0.5 * s / max(self.fisher_samples, 1) for k, s in self.fisher_sums.items()}
        return {
            kind: magnitude_group_scores(groups, {lin.name: self.layers[lin.name].weight for lin in groups.linears})
            for kind, groups in self.structures.groups.items()
        }

    def compute_masks(self, step: int, target: float, context: PruningContext) -> dict[str, torch.Tensor]:
        self._flush_gate_grads()
        seen = {"taylor": self.steps_seen, "fisher": self.fisher_samples}.get(self.options.score, 1)
        if seen == 0 and target > self.current_target:
            raise ValueError(
                f"structured {self.options.score} pruning at step {step} to {target:.3f} has seen no gradient yet: "
                "start pruning after at least one training step (start_step >= 1)"
            )
        masks = self.element_masks(self.select_keep(self.group_scores(), target))
        if self.options.score == "taylor" and self.options.ema is None:
            self.steps_seen = 0
        if self.options.score == "fisher":
            self.fisher_samples = 0
            for sums in self.fisher_sums.values():
                sums.zero_()
        return masks

    # ---- per-sample gate gradients (score "fisher") ------------------------------------------
    def _install_fisher_hooks(self) -> None:
        """Forward hooks on the coupled Linears that, in training, hook the output's gradient and add each
        sample's ``∂L_n/∂m_g`` contribution to ``_pending[kind]`` (summed over the group's Linears)."""
        for kind, groups in self.structures.groups.items():
            for lin in groups.linears:
                module = self.layers[lin.name]
                self._fisher_hooks.append(module.register_forward_hook(self._gate_hook(kind, lin.group_ids, lin.axis)))
        self._fisher_hooks.append(self.model.register_forward_pre_hook(lambda *_: self._flush_gate_grads()))

    def _gate_hook(self, kind: str, ids: torch.Tensor, axis: int) -> Any:
        num_groups = self.structures.groups[kind].num_groups

        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            if not (module.training and torch.is_grad_enabled() and output.requires_grad):
                return
            x = args[0].detach()
            if axis == 0:
                y = output.detach() - (module.bias.detach() if module.bias is not None else 0)

                def grad_hook(grad: torch.Tensor) -> None:
                    self._add_pending(kind, gate_grads_rows(ids, num_groups, y, grad))
            else:
                weight = module.weight.detach()

                def grad_hook(grad: torch.Tensor) -> None:
                    self._add_pending(kind, gate_grads_columns(ids, num_groups, x, grad @ weight.to(grad.dtype)))

            output.register_hook(grad_hook)

        return hook

    def _add_pending(self, kind: str, values: torch.Tensor) -> None:
        values = values.detach().cpu()
        pending = self._pending.get(kind)
        self._pending[kind] = values if pending is None else pending + values

    def _flush_gate_grads(self) -> None:
        """Fold the finished backward pass's per-sample gate gradients into ``Σ_n (∂L_n/∂m_g)²``."""
        if not self._pending:
            return
        samples = 0
        for kind, values in self._pending.items():
            self.fisher_sums[kind] += values.pow(2).sum(0)
            samples = values.shape[0]
        self.fisher_samples += samples
        self._pending = {}

    # ---- Trainer events ---------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.options.score == "fisher" and not self._fisher_hooks:
            self._install_fisher_hooks()

    def on_train_end(self, args, state, control, **kwargs):
        super().on_train_end(args, state, control, **kwargs)
        for handle in self._fisher_hooks:
            handle.remove()
        self._fisher_hooks = []

    @torch.no_grad()
    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._flush_gate_grads()
        if self.options.score == "taylor":
            for kind, groups in self.structures.groups.items():
                names = [lin.name for lin in groups.linears]
                weights = {n: self.layers[n].weight for n in names}
                importance = taylor_group_importance(groups, weights, {n: weights[n].grad for n in names})
                accumulate(self.taylor_scores[kind], importance.cpu(), self.steps_seen, self.options.ema)
            self.steps_seen += 1
        super().on_pre_optimizer_step(args, state, control, **kwargs)

    # ---- checkpoint state (group scores are small: JSON) ------------------------------------
    def method_state(self) -> dict[str, Any]:
        self._flush_gate_grads()
        return {
            "steps_seen": self.steps_seen,
            "taylor_scores": {k: s.tolist() for k, s in self.taylor_scores.items()},
            "fisher_samples": self.fisher_samples,
            "fisher_sums": {k: s.tolist() for k, s in self.fisher_sums.items()},
        }

    def load_method_state(self, state: dict[str, Any]) -> None:
        self.steps_seen = int(state.get("steps_seen", 0))
        self.fisher_samples = int(state.get("fisher_samples", 0))
        for kind, values in state.get("fisher_sums", {}).items():
            if kind in self.fisher_sums:
                self.fisher_sums[kind].copy_(torch.tensor(values, dtype=torch.float32))
        for kind, values in state.get("taylor_scores", {}).items():
            if kind in self.taylor_scores:
                self.taylor_scores[kind].copy_(torch.tensor(values, dtype=torch.float32))
