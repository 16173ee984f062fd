"""`StructuredMovementCallback`: movement pruning of whole heads and FFN neurons (group scores, straight-through).

Each group ``g`` (an attention head, an FFN neuron; `prune_trainer.structures`) has one trainable score ``S_g``.
The group's output — its columns of the attention output / FFN output Linear, where CoFi puts its head and
intermediate masks (Xia et al. 2022) — is multiplied by the gate ``STE(S_g, m_g)``, whose forward value is the
group's 0/1 mask ``m_g`` and whose backward passes the gradient to ``S_g`` unchanged (Sanh et al. 2020, eq. 2–3,
applied to groups): ``∂L/∂S_g = Σ_{c∈g} ∂L/∂w'_c · w_c`` over the output columns ``w' = w·m_g``. The group's input
rows keep training, so a removed group's score still sees its real contribution and the group can come back
while the masks move (gating the input rows too would make that gradient vanish at ``m_g = 0``).

- hard: ``m = Top(S)``, the best ``1 − s_t`` of the groups of each kind (global or per layer, floors and rounding
  of `GroupOptions`), recomputed after every optimizer step;
- soft: ``m_g = 1[σ(S_g) > τ_t]`` (per-layer counts rounded up to ``round_to``) with ``λ_t · mean σ(S)`` added to
  the loss; ``τ_t``, ``λ_t`` ramp with the schedule as in `MovementPruningCallback`.

The scores live on the model (a Parameter ``group_scores`` on the first coupled Linear of each kind in each layer),
so checkpoints carry them with the weights; their optimizer group, LR schedule, DDP averaging and optimizer state
come from `TrainableScoresMixin`. At the end of training the masks are frozen: the removed groups' weights and
biases are zeroed and the scores dropped, and `export_structured_model` slices the groups away.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from prune_trainer.callbacks.base import MethodNeeds, PruningContext
from prune_trainer.callbacks.movement import TrainableScoresMixin
from prune_trainer.callbacks.structured import GroupOptions, GroupPruningCallback
from prune_trainer.config import PruningConfig
from prune_trainer.masking.masked_linear import straight_through_mask
from prune_trainer.methods.movement import logit
from prune_trainer.methods.structured import threshold_groups

SCORE_PARAM = "group_scores"


@dataclass
class StructuredMovementOptions(GroupOptions):
    """`GroupOptions` plus movement's: ``variant`` ``"hard"`` (exact scheduled fraction of groups) or ``"soft"``
    (threshold + penalty; the reached fraction is set by ``final_lambda``), ``score_lr`` (the scores' learning
    rate, no weight decay), ``score_init`` (constant initial score), ``final_threshold`` (soft: final sigmoid
    threshold ``τ_f``) and ``final_lambda`` (soft: final penalty ``λ_f``)."""

    section = "structured movement options"

    variant: Literal["hard", "soft"] = "hard"
    score_lr: float = 1e-2
    score_init: float = 0.0
    final_threshold: float = 0.1
    final_lambda: float = 0.0

    def validate(self) -> None:
        super().validate()
        if not self.score_lr > 0:
            raise ValueError(f"{self.section}: score_lr must be > 0, got {self.score_lr!r}")
        if not 0.0 < self.final_threshold < 1.0:
            raise ValueError(f"{self.section}: final_threshold must be in (0, 1), got {self.final_threshold!r}")
        if self.final_lambda < 0:
            raise ValueError(f"{self.section}: final_lambda must be >= 0, got {self.final_lambda!r}")


class StructuredMovementCallback(TrainableScoresMixin, GroupPruningCallback):
    """Hard or soft movement pruning of attention heads and FFN neurons (options: `StructuredMovementOptions`).

    Example::

        pruner = StructuredMovementCallback(model, variant="hard", final_sparsity=0.5, start_step=0.1,
                                            end_step=0.7, score_lr=1e-2)
        Trainer(model=model, args=args, ..., callbacks=[pruner]).train()
        export_structured_model(model, "out/pruned", tokenizer)
    """

    method_name = "structured_movement"
    options_class = StructuredMovementOptions
    needs = MethodNeeds(keeps_zeros=False, monotone=False, when="every_step")

    def __init__(self, model: nn.Module, config: PruningConfig | None = None, **overrides: Any) -> None:
        super().__init__(model, config, **overrides)
        opts: StructuredMovementOptions = self.options
        self.init_score_training(opts)
        self._owners: dict[str, list[str]] = {}
        """Per kind, the Linear holding each layer's score Parameter (layer order)."""
        for kind, groups in self.structures.groups.items():
            offsets = groups.layer_offsets()
            owners: dict[int, str] = {}
            for lin in groups.linears:
                if lin.axis != 1:  # the gate sits on the group's output: the output Linear's columns
                    continue
                layer_index = int(groups.group_layer[lin.group_ids[0]])
                owner = self.layers[lin.name]
                scores = torch.full((groups.sizes[layer_index],), float(opts.score_init), device=owner.weight.device)
                owner.register_parameter(SCORE_PARAM, nn.Parameter(scores, requires_grad=False))
                local = (lin.group_ids - offsets[layer_index]).to(owner.weight.device)
                owner.weight_gate = _gate(owner, local)
                owners[layer_index] = lin.name
            self._owners[kind] = [owners[i] for i in range(len(groups.sizes))]

    # ---- scores and masks --------------------------------------------------------------------
    def score_params(self) -> list[nn.Parameter]:
        """The per-layer group score Parameters, kind by kind (empty once finalized)."""
        params = (getattr(self.layers[n], SCORE_PARAM, None) for names in self._owners.values() for n in names)
        return [p for p in params if p is not None]

    def group_scores(self) -> dict[str, torch.Tensor]:
        """Scores ``S`` [G] of each kind (detached, global group order)."""
        return {
            kind: torch.cat([getattr(self.layers[n], SCORE_PARAM).detach().float().cpu() for n in names])
            for kind, names in self._owners.items()
        }

    def compute_masks(self, step: int, target: float, context: PruningContext) -> dict[str, torch.Tensor]:
        if not self.score_params():
            return {}
        scores = self.group_scores()
        if self.variant == "hard":
            return self.element_masks(self.select_keep(scores, target))
        p = self.progress(step)
        self.current_threshold = p * self.final_threshold
        self.current_lambda = p * self.final_lambda
        threshold = logit(self.current_threshold)
        keep = {
            kind: threshold_groups(groups, scores[kind], threshold, *self.floors[kind])
            for kind, groups in self.structures.groups.items()
        }
        return self.element_masks(keep)

    @torch.no_grad()
    def freeze_masks(self) -> None:
        """Zero the removed groups' weights and biases, drop the gates and the scores."""
        for layer in self.layers.values():
            layer.weight_gate = None
            layer.apply_mask()
            if hasattr(layer, SCORE_PARAM):
                delattr(layer, SCORE_PARAM)
        self._bias_keep = None
        self.apply_bias_masks()


def _gate(layer: nn.Module, local_ids: torch.Tensor) -> Any:
    """``() -> gate [1, in]`` for the output Linear ``layer`` of a group kind: ``STE(S, m)[ids]`` per column, with
    the group mask ``m`` read off the layer's own element mask (a group is whole columns of it)."""

    def gate() -> torch.Tensor:
        scores = getattr(layer, SCORE_PARAM)
        group_mask = torch.zeros_like(scores, dtype=torch.bool).index_put_((local_ids,), layer.weight_mask[0, :])
        return straight_through_mask(scores, group_mask)[local_ids][None, :]

    return gate
