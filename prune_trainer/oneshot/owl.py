"""OWL layer-wise sparsity (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity"): layers with more Wanda-score
outliers are pruned less.

Outlier ratio of layer ``l``: ``D_l = P(A > M · mean A)`` over its Wanda scores ``A = |W|·‖X‖``.
Allocation (Yin et al. 2024): ``S_l = α (1 − D_l)`` with ``α`` chosen so the parameter-weighted mean
``Σ_l n_l S_l / Σ_l n_l`` equals the target ``S``. Optional ``lam`` bounds every ``S_l`` to
``[S − λ, S + λ]`` as the original OWL does; ``α`` is then found by bisection on the clipped sum.
"""

from __future__ import annotations

import torch

from prune_trainer.masking.selection import check_sparsity

MAX_LAYER_SPARSITY = 0.99


def outlier_ratio(scores: torch.Tensor, m: float = 1.0) -> float:
    """``D = P(A > M · mean A)``: the fraction of scores above ``M`` times their mean."""
    if scores.numel() == 0:
        raise ValueError("outlier_ratio got an empty score tensor")
    if m <= 0:
        raise ValueError(f"OWL hyper-parameter M must be > 0, got {m}")
    scores = scores.float()
    return float((scores > m * scores.mean()).float().mean())


def owl_sparsities(
    outlier_ratios: dict[str, float],
    sizes: dict[str, int],
    sparsity: float,
    lam: float | None = None,
    iters: int = 100,
) -> dict[str, float]:
    """Per-layer sparsities ``S_l = clip(α (1 − D_l))`` whose ``n_l``-weighted mean is ``sparsity``."""
    check_sparsity(sparsity)
    if set(outlier_ratios) != set(sizes):
        raise ValueError(f"outlier ratios and sizes name different layers: {sorted(set(outlier_ratios) ^ set(sizes))}")
    if not outlier_ratios:
        raise ValueError("owl_sparsities needs at least one layer")
    if lam is not None and not 0 <= lam < 1:
        raise ValueError(f"OWL lambda must be in [0, 1), got {lam}")
    names = list(outlier_ratios)
    d = torch.tensor([outlier_ratios[n] for n in names], dtype=torch.float64)
    n = torch.tensor([sizes[n] for n in names], dtype=torch.float64)
    lo = max(0.0, sparsity - lam) if lam is not None else 0.0
    hi = min(MAX_LAYER_SPARSITY, sparsity + lam) if lam is not None else MAX_LAYER_SPARSITY
    base = (1.0 - d).clamp_min(1e-6)
    target = sparsity * n.sum()

    def total(alpha: float) -> float:
        return float((n * (alpha * base).clamp(lo, hi)).sum())

    a_lo, a_hi = 0.0, hi / float(base.min())  # total(a_hi) = hi · Σn ≥ target
    for _ in range(iters):
        mid = 0.5 * (a_lo + a_hi)
        a_lo, a_hi = (mid, a_hi) if total(mid) < target else (a_lo, mid)
    s = (0.5 * (a_lo + a_hi) * base).clamp(lo, hi)
    return {name: float(v) for name, v in zip(names, s, strict=True)}
