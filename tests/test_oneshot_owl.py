"""OWL outlier ratios and layer-wise sparsity allocation."""

from __future__ import annotations

import pytest
import torch

from prune_trainer.oneshot.owl import outlier_ratio, owl_sparsities


def test_outlier_ratio_counts_scores_above_m_times_mean():
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 6.0])  # mean 2
    assert outlier_ratio(scores, 1.0) == pytest.approx(0.2)
    assert outlier_ratio(scores, 3.5) == pytest.approx(0.0)
    assert outlier_ratio(torch.tensor([1.0, 3.0]), 1.0) == pytest.approx(0.5)


@pytest.mark.parametrize("lam", [None, 0.05, 0.2])
@pytest.mark.parametrize("target", [0.5, 0.7, 0.8])
def test_allocations_average_to_target(lam, target):
    g = torch.Generator().manual_seed(0)
    names = [f"l{i}" for i in range(12)]
    ratios = dict(zip(names, (torch.rand(12, generator=g) * 0.4).tolist(), strict=True))
    sizes = dict(zip(names, [384 * 384] * 8 + [384 * 1536] * 4, strict=True))
    alloc = owl_sparsities(ratios, sizes, target, lam)
    mean = sum(alloc[n] * sizes[n] for n in names) / sum(sizes.values())
    assert mean == pytest.approx(target, abs=1e-6)
    if lam is not None:
        assert all(target - lam - 1e-9 <= s <= target + lam + 1e-9 for s in alloc.values())


def test_more_outliers_means_less_sparsity_and_proportional_form():
    ratios = {"a": 0.1, "b": 0.3, "c": 0.2}
    sizes = {"a": 100, "b": 100, "c": 100}
    alloc = owl_sparsities(ratios, sizes, 0.6)
    assert alloc["b"] < alloc["c"] < alloc["a"]
    # S_l = α (1 − D_l) with α = S Σn / Σ n (1 − D)  (deep-dive §4)
    alpha = 0.6 * 300 / (100 * (0.9 + 0.7 + 0.8))
    for k, d in ratios.items():
        assert alloc[k] == pytest.approx(alpha * (1 - d), rel=1e-6)


def test_owl_errors():
    with pytest.raises(ValueError, match="1.2"):
        owl_sparsities({"a": 0.1}, {"a": 10}, 1.2)
    with pytest.raises(ValueError, match="different layers"):
        owl_sparsities({"a": 0.1}, {"b": 10}, 0.5)
    with pytest.raises(ValueError, match="M must be > 0"):
        outlier_ratio(torch.ones(3), 0.0)
