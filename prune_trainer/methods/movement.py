"""Movement pruning math (Sanh, Wolf & Rush 2020, "Movement Pruning: Adaptive Sparsity by Fine-Tuning").

Each pruned layer carries trainable scores ``S`` (same shape as ``W``) and computes
``y = x (W ⊙ M(S))ᵀ + b``. The mask is not differentiable, so the straight-through estimator
(paper eq. 2–3) passes the mask's gradient to the scores unchanged:
``∂L/∂S_ij = ∂L/∂M_ij = (∂L/∂y)ᵀx ⊙ W``, i.e. ``Σ_tokens (∂L/∂y_i) x_j W_ij``; the layer side (scores on
`MaskedLinear`, the straight-through op) lives in `prune_trainer.masking.masked_linear`.

- hard movement pruning: ``M = Top_v(S)``, the ``k = (1 - s)·n`` largest scores (per layer or
  across layers), `hard_movement_masks`;
- soft movement pruning: ``M = 1[σ(S) > τ]`` (equivalently ``S > logit(τ)``), with the penalty
  ``λ · mean_l mean(σ(S_l))`` added to the loss (paper §4, the "L1 on σ(S)" of the reference code),
  `soft_movement_masks` and `sigmoid_l1_penalty`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch


def keep_top_k(flat: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask keeping exactly ``k`` largest entries of a 1-D tensor (ties broken by position).

    One ``kthvalue`` (selection, O(n)) instead of a sort or a large ``topk``: entries above the
    ``(n-k)``-th smallest value are kept, then the first tied entries fill the remaining slots.
    """
    n = flat.numel()
    if k >= n:
        return torch.ones_like(flat, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(flat, dtype=torch.bool)
    threshold = torch.kthvalue(flat, n - k).values
    mask = flat > threshold
    deficit = k - int(mask.sum())
    if deficit > 0:
        ties = flat == threshold
        mask |= ties & (torch.cumsum(ties, 0) <= deficit)
    return mask


def _floor_count(numel: int, min_kept_fraction: float) -> int:
    return max(1, int(round(min_kept_fraction * numel))) if min_kept_fraction > 0 else 0


def hard_movement_masks(
    scores: dict[str, torch.Tensor], sparsity: float, scope: str = "layer", min_kept_fraction: float = 0.0
) -> dict[str, torch.Tensor]:
    """Top-k masks of the scores: keep exactly ``n - round(s·n)`` weights (per layer or in total).

    ``scope="layer"`` is the reference's per-matrix ``TopKBinarizer``; ``scope="global"`` ranks all
    layers' scores together, each layer keeping at least ``min_kept_fraction`` of its weights (its
    own top scores; the floor counts toward the budget, which it can only exceed when the floors
    alone need more).
    """
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity!r}")
    if scope == "layer":
        out = {}
        for name, s in scores.items():
            n = s.numel()
            out[name] = keep_top_k(s.detach().reshape(-1), n - int(round(sparsity * n))).view_as(s)
        return out
    if scope != "global":
        raise ValueError(f"unknown sparsity scope {scope!r}; choose 'global' or 'layer'")
    names = list(scores)
    flats = [scores[n].detach().reshape(-1).float() for n in names]
    sizes = [f.numel() for f in flats]
    total = sum(sizes)
    keep = total - int(round(sparsity * total))
    floors = [_floor_count(n, min_kept_fraction) for n in sizes]
    mask = keep_top_k(torch.cat(flats), keep)
    chunks = list(torch.split(mask, sizes))
    if any(int(c.sum()) < f for c, f in zip(chunks, floors, strict=True)):
        # Some layer fell below its floor: give every layer's top-`floor` scores +inf and redo.
        flats = [
            f.masked_fill(keep_top_k(f, fl), float("inf")) if fl else f for f, fl in zip(flats, floors, strict=True)
        ]
        mask = keep_top_k(torch.cat(flats), max(keep, sum(floors)))
        chunks = list(torch.split(mask, sizes))
    return {name: chunk.view_as(scores[name]) for name, chunk in zip(names, chunks, strict=True)}


def logit(p: float) -> float:
    """``log(p / (1 - p))`` with ``logit(0) = -inf``: the score threshold equivalent to ``σ(S) > p``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"sigmoid threshold must be in [0, 1), got {p!r}")
    return -math.inf if p == 0.0 else math.log(p / (1.0 - p))


def soft_movement_masks(
    scores: dict[str, torch.Tensor], sigmoid_threshold: float, min_kept_fraction: float = 0.0
) -> dict[str, torch.Tensor]:
    """``M = 1[σ(S) > τ] = 1[S > logit(τ)]`` with one ``τ`` for all layers (the reference's
    ``sigmoied_threshold``); a layer keeping fewer than ``min_kept_fraction`` of its weights keeps
    its top ones instead (so no layer is emptied)."""
    thr = logit(sigmoid_threshold)
    out = {}
    for name, s in scores.items():
        s = s.detach()
        mask = s > thr
        floor = _floor_count(s.numel(), min_kept_fraction)
        if floor and int(mask.sum()) < floor:
            mask = keep_top_k(s.reshape(-1), floor).view_as(s)
        out[name] = mask
    return out


def sigmoid_l1_penalty(scores: Sequence[torch.Tensor]) -> torch.Tensor:
    """``R(S) = (1/L) Σ_l ‖σ(S_l)‖₁ / n_l``: mean over layers of the mean of ``σ(S)`` (differentiable).

    The soft movement pruning regulariser (Sanh et al. 2020 §4; the reference code's ``l1`` mode).
    """
    if not scores:
        raise ValueError("sigmoid_l1_penalty needs at least one score tensor")
    return torch.stack([torch.sigmoid(s).mean() for s in scores]).mean()


def find_lambda(
    reached_sparsity: Callable[[float], float],
    target: float,
    low: float = 1.0,
    high: float = 1000.0,
    tolerance: float = 0.01,
    max_evals: int = 8,
) -> tuple[float, float]:
    """Find the soft-movement ``λ`` whose run reaches ``target`` sparsity (geometric bisection).

    ``reached_sparsity(λ)`` runs (typically a short) soft movement pruning and returns the sparsity
    it reached; it must be non-decreasing in ``λ``, as the penalty only pushes scores down. Returns
    the best ``(λ, reached sparsity)`` seen. ``[low, high]`` is widened ×10 if it does not bracket
    the target (this counts toward ``max_evals``).
    """
    if not 0.0 < target < 1.0:
        raise ValueError(f"target sparsity must be in (0, 1), got {target!r}")
    if not 0.0 < low < high:
        raise ValueError(f"need 0 < low < high, got low={low!r}, high={high!r}")
    seen: dict[float, float] = {}

    def evaluate(lam: float) -> float:
        if lam not in seen:
            seen[lam] = float(reached_sparsity(lam))
        return seen[lam]

    while len(seen) < max_evals and evaluate(low) > target + tolerance:
        low /= 10.0
    while len(seen) < max_evals and evaluate(high) < target - tolerance:
        high *= 10.0
    while len(seen) < max_evals:
        mid = math.sqrt(low * high)
        reached = evaluate(mid)
        if abs(reached - target) <= tolerance:
            break
        if reached < target:
            low = mid
        else:
            high = mid
    best = min(seen, key=lambda lam: abs(seen[lam] - target))
    return best, seen[best]
