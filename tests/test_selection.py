import pytest
import torch

from prune_trainer.masking import (
    check_sparsity,
    global_topk_masks,
    nm_mask,
    parse_pattern,
    select_masks,
    topk_mask,
)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.99])
def test_topk_mask_exact_count_and_keeps_largest(sparsity):
    scores = torch.randn(37, 53)
    mask = topk_mask(scores, sparsity)
    n = scores.numel()
    assert int(mask.sum()) == n - round(sparsity * n)
    if 0 < mask.sum() < n:
        assert scores[mask].min() >= scores[~mask].max()


def test_global_topk_single_threshold_across_layers():
    scores = {"a": torch.randn(10, 10), "b": torch.randn(20, 5) * 3}
    masks = global_topk_masks(scores, 0.7)
    kept = sum(int(m.sum()) for m in masks.values())
    assert kept == 200 - 140
    kept_min = min(scores[n][masks[n]].min() for n in scores)
    pruned_max = max(scores[n][~masks[n]].max() for n in scores)
    assert kept_min >= pruned_max


def test_global_topk_floor_keeps_every_layer_alive():
    scores = {"big": torch.rand(10, 10) + 10.0, "small": torch.rand(10, 10)}
    without = global_topk_masks(scores, 0.5)
    assert int(without["small"].sum()) == 0
    with_floor = global_topk_masks(scores, 0.5, min_kept_fraction=0.05)
    assert int(with_floor["small"].sum()) == 5
    assert sum(int(m.sum()) for m in with_floor.values()) == 100


def test_nm_mask_groups():
    scores = torch.randn(8, 16)
    mask = nm_mask(scores, 2, 4)
    groups = mask.view(8, 4, 4)
    assert bool((groups.sum(-1) == 2).all())
    # The kept two are the two largest of each group.
    g_scores = scores.view(8, 4, 4)
    kept_min = torch.where(groups, g_scores, torch.inf).min(-1).values
    pruned_max = torch.where(~groups, g_scores, -torch.inf).max(-1).values
    assert bool((kept_min >= pruned_max).all())


def test_nm_shape_and_pattern_errors():
    with pytest.raises(ValueError, match="does not divide in_features=10"):
        nm_mask(torch.randn(4, 10), 2, 4)
    with pytest.raises(ValueError, match="0 < N < M"):
        parse_pattern("4:2")
    with pytest.raises(ValueError, match="'N:M'"):
        parse_pattern("two-four")
    assert parse_pattern("unstructured") is None
    assert parse_pattern("2:4") == (2, 4)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "0.5", None, True])
def test_sparsity_out_of_range_is_an_error(bad):
    with pytest.raises(ValueError, match="sparsity must be a number in \\[0, 1\\)"):
        check_sparsity(bad)


def test_select_masks_scopes():
    scores = {"a": torch.randn(8, 8), "b": torch.randn(8, 8) * 5}
    per_layer = select_masks(scores, 0.5, scope="layer")
    assert all(int(m.sum()) == 32 for m in per_layer.values())
    nm = select_masks(scores, 0.9, pattern="2:4")
    assert all(int(m.sum()) == 32 for m in nm.values())
    with pytest.raises(ValueError, match="unknown sparsity scope"):
        select_masks(scores, 0.5, scope="row")
