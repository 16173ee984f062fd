import pytest
import torch
from torch import nn

from prune_trainer.masking import (
    MaskedLinear,
    find_target_linears,
    inject_masked_layers,
    masked_layers,
    unwrap_masked_layers,
    weight_sparsity_report,
)


def test_from_linear_shares_parameters_and_matches_output():
    lin = nn.Linear(8, 4)
    masked = MaskedLinear.from_linear(lin)
    assert masked.weight is lin.weight and masked.bias is lin.bias
    assert masked.weight_mask.dtype == torch.bool and bool(masked.weight_mask.all())
    x = torch.randn(3, 8)
    torch.testing.assert_close(masked(x), lin(x))


def test_set_mask_zeroes_pruned_weights_and_to_linear_bakes_them():
    masked = MaskedLinear.from_linear(nn.Linear(6, 3))
    mask = torch.rand(3, 6) > 0.5
    masked.set_mask(mask)
    assert torch.equal(masked.weight == 0, ~mask | (masked.weight == 0))
    assert bool((masked.weight[~mask] == 0).all())
    plain = masked.to_linear()
    assert type(plain) is nn.Linear
    torch.testing.assert_close(plain.weight, masked.weight * mask)
    x = torch.randn(2, 6)
    torch.testing.assert_close(plain(x), masked(x))


def test_set_mask_wrong_shape_is_an_error():
    masked = MaskedLinear.from_linear(nn.Linear(6, 3))
    with pytest.raises(ValueError, match="mask shape"):
        masked.set_mask(torch.ones(6, 3))


def test_mask_in_forward_uses_masked_weight():
    masked = MaskedLinear.from_linear(nn.Linear(4, 2), mask_in_forward=True)
    masked.weight_mask[:, :2] = False  # mask changed without zeroing the weights
    x = torch.randn(5, 4)
    expected = x[:, 2:] @ masked.weight[:, 2:].T + masked.bias
    torch.testing.assert_close(masked(x), expected)


def test_inject_default_targets_on_bert(model):
    layers = inject_masked_layers(model)
    # 2 layers x (query, key, value, attention output, intermediate, output)
    assert len(layers) == 12
    assert all("encoder.layer." in n for n in layers)
    assert not isinstance(model.classifier, MaskedLinear)
    # Keys unchanged, plus one mask per layer.
    keys = set(model.state_dict())
    assert "bert.encoder.layer.0.attention.self.query.weight" in keys
    assert "bert.encoder.layer.0.attention.self.query.weight_mask" in keys
    # Idempotent: a second call returns the same modules.
    again = inject_masked_layers(model)
    assert all(again[n] is layers[n] for n in layers)


def test_inject_custom_patterns_and_errors(model):
    names = find_target_linears(model, targets=[r"attention\.self\.query"])
    assert names == [f"bert.encoder.layer.{i}.attention.self.query" for i in range(2)]
    assert find_target_linears(model, targets=["classifier"], exclude=[]) == ["classifier"]
    with pytest.raises(ValueError, match="match no nn.Linear"):
        inject_masked_layers(model, targets=["does_not_exist"])
    with pytest.raises(ValueError, match="invalid target pattern"):
        find_target_linears(model, targets=["(unclosed"])


def test_unwrap_restores_plain_linears_with_zeros(model):
    layers = inject_masked_layers(model)
    for layer in layers.values():
        layer.set_mask(torch.rand_like(layer.weight) > 0.3)
    report_before = weight_sparsity_report(model)
    unwrap_masked_layers(model)
    assert masked_layers(model) == {}
    report_after = weight_sparsity_report(model, list(layers))
    assert report_after["global_sparsity"] == pytest.approx(report_before["global_sparsity"])
    assert 0.2 < report_after["global_sparsity"] < 0.4
