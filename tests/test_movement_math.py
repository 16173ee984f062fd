"""Movement pruning math: straight-through gradient, top-k / threshold masks, penalty, λ search."""

import math

import pytest
import torch
from torch import nn

from prune_trainer.masking import MaskedLinear
from prune_trainer.methods.movement import (
    find_lambda,
    hard_movement_masks,
    keep_top_k,
    logit,
    sigmoid_l1_penalty,
    soft_movement_masks,
)


def _layer(out_f=6, in_f=5, seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    layer = MaskedLinear.from_linear(nn.Linear(in_f, out_f).to(dtype), mask_in_forward=True)
    scores = layer.attach_scores(0.0)
    with torch.no_grad():
        scores.copy_(torch.randn_like(scores))
        layer.weight_mask.copy_(torch.rand(out_f, in_f) > 0.4)
    return layer


def test_ste_gradient_is_exactly_dL_dy_x_times_w():
    layer = _layer()
    x = torch.randn(3, 4, 5, dtype=torch.float64)  # batch, tokens, in
    upstream = torch.randn(3, 4, 6, dtype=torch.float64)  # ∂L/∂y
    (layer(x) * upstream).sum().backward()

    g = upstream.reshape(-1, 6).T @ x.reshape(-1, 5)  # Σ_tokens (∂L/∂y_i) x_j  →  [out, in]
    w, m = layer.weight.detach(), layer.weight_mask.double()
    torch.testing.assert_close(layer.mask_scores.grad, g * w, rtol=0, atol=1e-12)  # ∂L/∂S = ∂L/∂M = g ⊙ W
    torch.testing.assert_close(layer.weight.grad, g * m, rtol=0, atol=1e-12)  # ∂L/∂W = g ⊙ M
    torch.testing.assert_close(layer.bias.grad, upstream.sum((0, 1)), rtol=0, atol=1e-12)
    # Pruned weights still get a score gradient (they can come back), but no weight gradient.
    assert bool((layer.weight.grad[~layer.weight_mask] == 0).all())
    assert bool((layer.mask_scores.grad[~layer.weight_mask] != 0).any())


def test_forward_uses_masked_weight_and_keeps_pruned_values():
    layer = _layer()
    x = torch.randn(2, 5, dtype=torch.float64)
    expected = x @ (layer.weight * layer.weight_mask).T + layer.bias
    torch.testing.assert_close(layer(x), expected)
    assert bool((layer.weight[~layer.weight_mask] != 0).all())  # not zeroed while scores are attached
    layer.freeze()
    assert layer.mask_scores is None and "mask_scores" not in dict(layer.named_parameters())
    assert bool((layer.weight[~layer.weight_mask] == 0).all())
    torch.testing.assert_close(layer(x), expected)


def test_keep_top_k_is_exact_with_ties():
    torch.manual_seed(0)
    flat = torch.randint(0, 5, (1000,)).float()  # many ties
    for k in (0, 1, 137, 500, 999, 1000):
        mask = keep_top_k(flat, k)
        assert int(mask.sum()) == k
        if 0 < k < 1000:
            assert flat[mask].min() >= flat[~mask].max()


def test_hard_masks_per_layer_and_global_match_sorting():
    torch.manual_seed(1)
    scores = {"a": torch.randn(8, 16), "b": torch.randn(4, 32) + 1.0, "c": torch.randn(16, 4) - 3.0}
    per_layer = hard_movement_masks(scores, 0.75, scope="layer")
    for name, s in scores.items():
        assert int(per_layer[name].sum()) == s.numel() // 4
        assert s[per_layer[name]].min() > s[~per_layer[name]].max()
    glob = hard_movement_masks(scores, 0.75, scope="global")
    allscores = torch.cat([s.reshape(-1) for s in scores.values()])
    kth = allscores.sort(descending=True).values[allscores.numel() // 4 - 1]
    for name, s in scores.items():
        assert torch.equal(glob[name], s >= kth)
    assert int(glob["c"].sum()) == 0  # layer c's scores are all below the others
    floored = hard_movement_masks(scores, 0.75, scope="global", min_kept_fraction=0.1)
    total = sum(int(m.sum()) for m in floored.values())
    assert total == allscores.numel() // 4  # the floor counts toward the budget
    assert int(floored["c"].sum()) == round(0.1 * 64)
    with pytest.raises(ValueError, match="scope"):
        hard_movement_masks(scores, 0.5, scope="row")


def test_soft_masks_threshold_equivalence_and_floor():
    torch.manual_seed(2)
    scores = {"a": torch.randn(10, 10), "b": torch.randn(10, 10) - 6.0}
    masks = soft_movement_masks(scores, 0.3)
    for name, s in scores.items():
        assert torch.equal(masks[name], torch.sigmoid(s) > 0.3)
    assert logit(0.0) == -math.inf and logit(0.5) == 0.0
    assert bool(soft_movement_masks(scores, 0.0)["b"].all())  # τ = 0 keeps everything
    floored = soft_movement_masks(scores, 0.3, min_kept_fraction=0.05)
    top5 = scores["b"].reshape(-1).topk(5).values
    assert int(floored["b"].sum()) == 5 and bool((scores["b"][floored["b"]] >= top5.min()).all())


def test_sigmoid_l1_penalty_value_and_gradient():
    a = torch.randn(3, 4, requires_grad=True)
    b = torch.randn(5, 2, requires_grad=True)
    r = sigmoid_l1_penalty([a, b])
    expected = 0.5 * (torch.sigmoid(a).sum() / 12 + torch.sigmoid(b).sum() / 10)
    torch.testing.assert_close(r, expected)
    r.backward()
    sa = torch.sigmoid(a.detach())
    torch.testing.assert_close(a.grad, 0.5 * sa * (1 - sa) / 12)


def test_find_lambda_bisects_a_monotone_response():
    calls = []

    def reached(lam):  # a saturating, increasing response: sparsity = 1 - exp(-λ/50)
        calls.append(lam)
        return 1 - math.exp(-lam / 50)

    lam, s = find_lambda(reached, 0.9, low=1.0, high=1000.0, tolerance=0.005, max_evals=12)
    assert abs(s - 0.9) <= 0.005 and lam == pytest.approx(-50 * math.log(0.1), rel=0.05)
    assert len(calls) <= 12
    lam, s = find_lambda(reached, 0.9, low=1.0, high=10.0, tolerance=0.005, max_evals=12)  # widens the bracket
    assert abs(s - 0.9) <= 0.005
    with pytest.raises(ValueError, match="target"):
        find_lambda(reached, 1.5)
