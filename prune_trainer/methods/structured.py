"""Scores of coupled groups (heads, FFN neurons) and their selection under a target, floors and rounding.

Scores (higher = keep), over all coupled weights ``w_s`` of a group ``S`` (`prune_trainer.structures`):

- magnitude: the group L2 norm ``‖w_S‖₂ = sqrt(Σ_{s∈S} w_s²)`` (group-lasso norm; Yuan & Lin 2006, as used for
  structured pruning by Wen et al. 2016);
- first-order Taylor: ``Σ_{s∈S} |g_s·w_s|``, the per-weight first-order importance of Molchanov et al. 2019
  (eq. 3) summed over the group, from the per-step values accumulated by the callback;
- Fisher: ``½ w_Sᵀ F_SS w_S = ½ · mean_n (Σ_{s∈S} g_{n,s} w_s)²`` with the empirical Fisher of the group's weights
  over training samples ``n``: the second-order loss increase of removing ``S`` at a stationary point without a
  compensating update (OBD's quadratic term, LeCun et al. 1990, with the empirical Fisher as in oBERT, Kurtic et
  al. 2022, taken over the whole group as the mask-variable Fisher of Kwon et al. 2022, eq. 6–8).
  ``Σ_{s∈S} g_{n,s} w_s = ∂L_n/∂m_S`` is the gradient of sample ``n``'s loss w.r.t. a gate ``m_S`` multiplying the
  group's weights; `gate_grads_rows` / `gate_grads_columns` get it per sample from each Linear's activations.

Selection keeps, per kind, the ``G - round(target·G)`` best groups (globally across layers or per layer), with
kept sizes in each layer a multiple of ``round_to`` (or the whole layer) and at least ``floor`` groups per layer.
All groups of one kind have the same number of weights, so the target is also the removed fraction of weights.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from prune_trainer.masking.selection import check_sparsity, finite_scores
from prune_trainer.structures import GroupSet, group_reduce


def magnitude_group_scores(groups: GroupSet, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """``sqrt(Σ_{s∈S} w_s²)`` per group [G]."""
    return group_reduce(groups, {n: w.detach().float().pow(2) for n, w in weights.items()}).sqrt()


def taylor_group_importance(
    groups: GroupSet, weights: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]
) -> torch.Tensor:
    """``Σ_{s∈S} |g_s·w_s|`` per group [G] for one step's gradients (Linears without a gradient count 0)."""
    values = {
        n: (grads[n].detach().float() * w.detach().float()).abs() if grads.get(n) is not None else torch.zeros_like(w)
        for n, w in weights.items()
    }
    return group_reduce(groups, values)


def _per_sample_group_sums(ids: torch.Tensor, num_groups: int, prod: torch.Tensor) -> torch.Tensor:
    """``[N, ..., C]`` values summed over the middle (token) dims, then over each group's channels: ``[N, G]``."""
    per_channel = prod.reshape(prod.shape[0], -1, prod.shape[-1]).sum(1)
    out = torch.zeros(per_channel.shape[0], num_groups, device=per_channel.device)
    return out.index_add_(1, ids.to(per_channel.device), per_channel)


def gate_grads_rows(
    ids: torch.Tensor, num_groups: int, out_minus_bias: torch.Tensor, grad_out: torch.Tensor
) -> torch.Tensor:
    """Per-sample ``∂L_n/∂m_g`` from a Linear whose *rows* belong to groups: ``Σ_t Σ_{r∈g} ∂L/∂y[n,t,r]·(Wx)[n,t,r]``
    (``Σ_{r∈g,c} g_{n,rc} w_rc`` with ``g_{n,rc} = Σ_t ∂L/∂y[n,t,r] x[n,t,c]``). ``out_minus_bias`` is ``y − b``,
    ``[N, ..., out]``; returns ``[N, num_groups]`` (float32)."""
    return _per_sample_group_sums(ids, num_groups, grad_out.float() * out_minus_bias.float())


def gate_grads_columns(
    ids: torch.Tensor, num_groups: int, inputs: torch.Tensor, grad_in: torch.Tensor
) -> torch.Tensor:
    """Per-sample ``∂L_n/∂m_g`` from a Linear whose *columns* are grouped: ``Σ_t Σ_{c∈g} x[n,t,c]·(∂L/∂y W)[n,t,c]``
    (``grad_in = ∂L/∂y · W``, the gradient w.r.t. the input through this Linear only). Returns ``[N, num_groups]``."""
    return _per_sample_group_sums(ids, num_groups, grad_in.float() * inputs.float())


def threshold_groups(
    groups: GroupSet, scores: torch.Tensor, threshold: float, round_to: int = 1, floor: int = 1
) -> torch.Tensor:
    """Group keep-mask [G] of the groups scoring above ``threshold`` (soft movement: ``S > logit(τ)``), with each
    layer's kept count rounded up to a multiple of ``round_to`` (or the whole layer) and at least ``floor``; the
    kept groups of a layer are its best-scoring ones."""
    floor = check_group_sizes(groups, round_to, floor, groups.kind)
    scores = finite_scores(scores.detach().to("cpu").float())
    sizes = torch.tensor(groups.sizes)
    above = torch.zeros(len(groups.sizes), dtype=torch.long)
    above.index_add_(0, groups.group_layer, (scores > threshold).long())
    counts = torch.minimum(torch.clamp((above + round_to - 1) // round_to * round_to, min=floor), sizes)
    layer = groups.group_layer
    by_score = torch.sort(scores, descending=True, stable=True).indices
    order = by_score[torch.sort(layer[by_score], stable=True).indices]
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(order.numel()) - starts[layer[order]]
    keep = torch.zeros(groups.num_groups, dtype=torch.bool)
    keep[order] = rank < counts[layer[order]]
    return keep


def check_group_sizes(groups: GroupSet, round_to: int, floor: int, what: str) -> int:
    """The per-layer floor rounded up to a multiple of ``round_to``; ValueError when it or ``round_to`` exceeds a
    layer (the smallest layer is named). A floor of 0 lets a layer lose every group (sublayer removal)."""
    if round_to < 1 or floor < 0:
        raise ValueError(f"{what}: round_to must be >= 1 and the per-layer floor >= 0, got {round_to} and {floor}")
    smallest = min(groups.sizes)
    layer = groups.sizes.index(smallest)
    if round_to > smallest:
        raise ValueError(f"{what}: round_to {round_to} is larger than layer {layer}, which has {smallest}")
    kept_floor = -(-floor // round_to) * round_to
    if kept_floor > smallest:
        raise ValueError(
            f"{what}: the per-layer floor of {floor} (rounded to {kept_floor}) is more than layer {layer} "
            f"has ({smallest})"
        )
    return kept_floor


class _Blocks(NamedTuple):
    """Groups ordered by layer then score, cut into ``round_to`` blocks (see `select_groups`)."""

    order: torch.Tensor  # group ids, by layer, best score first within a layer
    block: torch.Tensor  # block id of each ordered group
    size: torch.Tensor  # groups per block
    score: torch.Tensor  # mean score per block; -inf if a member is non-finite, +inf for floor blocks
    floor: torch.Tensor  # block holds one of its layer's first ``floor`` groups
    per_layer: torch.Tensor  # blocks per layer


def _rank_blocks(groups: GroupSet, scores: torch.Tensor, round_to: int, floor: int) -> _Blocks:
    layer = groups.group_layer
    # order groups by layer, best score first within a layer (two stable sorts)
    by_score = torch.sort(scores, descending=True, stable=True).indices
    order = by_score[torch.sort(layer[by_score], stable=True).indices]
    sizes = torch.tensor(groups.sizes)
    starts = torch.cumsum(sizes, 0) - sizes
    rank = torch.arange(order.numel()) - starts[layer[order]]  # rank within its layer
    per_layer = (sizes + round_to - 1) // round_to
    block = (torch.cumsum(per_layer, 0) - per_layer)[layer[order]] + rank // round_to
    num_blocks = int(per_layer.sum())
    size = torch.zeros(num_blocks).index_add_(0, block, torch.ones(order.numel()))
    sorted_scores = scores[order]
    finite = torch.isfinite(sorted_scores)
    block_sum = torch.zeros(num_blocks).index_add_(0, block, torch.where(finite, sorted_scores, 0.0))
    block_bad = torch.zeros(num_blocks).index_add_(0, block, (~finite).float()) > 0
    block_floor = torch.zeros(num_blocks, dtype=torch.bool)
    block_floor[block[rank < floor]] = True
    score = (block_sum / size).masked_fill(block_bad, float("-inf")).masked_fill(block_floor, float("inf"))
    return _Blocks(order, block, size, score, block_floor, per_layer)


def select_groups(
    groups: GroupSet,
    scores: torch.Tensor,
    target: float,
    scope: str = "global",
    round_to: int = 1,
    floor: int = 1,
    removed: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group keep-mask [G] removing about ``target`` of the groups, lowest scores first.

    In each layer the groups are ranked by score and cut into blocks of ``round_to`` (the last one may be
    shorter); blocks are kept whole, best first, so a layer keeps a multiple of ``round_to`` groups or all of
    them. The first ``floor`` groups of every layer are always kept. ``scope="global"``: blocks compete across
    layers on their mean score until ``G - round(target·G)`` groups are kept; ``"layer"``: each layer keeps
    ``n_l - round(target·n_l)``. Counts are rounded up to whole blocks (never more removed than the target).
    ``removed`` groups rank last (a removed group stays removed); NaN/inf scores rank below finite ones.
    """
    check_sparsity(target, "target")
    floor = check_group_sizes(groups, round_to, floor, groups.kind)
    scores = finite_scores(scores.detach().to("cpu"))
    if removed is not None:
        scores = scores.masked_fill(removed.to("cpu"), float("-inf"))
    b = _rank_blocks(groups, scores, round_to, floor)
    if scope == "global":
        keep_total = groups.num_groups - int(round(target * groups.num_groups))
        best = torch.sort(b.score, descending=True, stable=True).indices  # ties: earlier block (same layer) first
        before = torch.cumsum(b.size[best], 0) - b.size[best]
        keep_block = torch.zeros(len(b.size), dtype=torch.bool)
        keep_block[best] = before < keep_total
    elif scope == "layer":
        sizes = torch.tensor(groups.sizes)
        keep_layer = sizes - torch.round(target * sizes.double()).long()
        starts = torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, b.per_layer)
        before = torch.cumsum(b.size, 0) - b.size - starts
        keep_block = before < keep_layer[torch.repeat_interleave(torch.arange(len(groups.sizes)), b.per_layer)]
    else:
        raise ValueError(f"scope must be 'global' or 'layer', got {scope!r}")
    keep_block |= b.floor
    keep = torch.zeros(groups.num_groups, dtype=torch.bool)
    keep[b.order] = keep_block[b.block]
    return keep
