"""Group movement pruning: straight-through group gradients, hard/soft runs, export of the result."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_trainer, tiny_bert

from prune_trainer import PruningConfig, StructuredMovementCallback, export_structured_model, load_pruned_model
from prune_trainer.callbacks import make_pruning_callback
from prune_trainer.methods.structured import threshold_groups
from prune_trainer.structures import find_structures


def _no_dropout(model):
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def test_group_score_gradient_is_the_gate_gradient_pruned_groups_included():
    """∂L/∂S_g == ∂L/∂m_g of explicit gates m (0 for removed groups) on the group's output columns."""
    torch.manual_seed(0)
    model = _no_dropout(tiny_bert(num_attention_heads=4))
    pruner = StructuredMovementCallback(model, final_sparsity=0.5, score_init=0.0)
    for p in pruner.score_params():
        p.requires_grad_(True)
    keep = {"heads": torch.tensor([1, 0, 1, 1, 0, 1, 1, 1], dtype=torch.bool),
            "ffn": torch.rand(128) > 0.4}
    for name, mask in pruner.element_masks(keep).items():
        pruner.layers[name].weight_mask.copy_(mask)
    ids = torch.randint(0, model.config.vocab_size, (3, 6))
    labels = torch.randint(0, model.config.num_labels, (3, 6))
    model.train()
    model(input_ids=ids, labels=labels).loss.backward()
    got = {kind: torch.cat([p.grad for p in params]) for kind, params in _params_by_kind(pruner).items()}
    # brute force: plain Linears, gates as leaves
    reference = _no_dropout(tiny_bert(num_attention_heads=4))
    structures = find_structures(reference)
    gates = {k: keep[k].float().requires_grad_(True) for k in keep}
    params = {n: p.detach() for n, p in reference.named_parameters()}
    gated = dict(params)
    for kind, groups in structures.groups.items():
        for lin in groups.linears:
            if lin.axis == 1:
                gated[f"{lin.name}.weight"] = params[f"{lin.name}.weight"] * gates[kind][lin.group_ids][None, :]
    reference.train()
    loss = torch.func.functional_call(reference, gated, (), {"input_ids": ids, "labels": labels}).loss
    expected = dict(zip(gates, torch.autograd.grad(loss, list(gates.values()))))
    for kind in keep:
        torch.testing.assert_close(got[kind], expected[kind], rtol=1e-5, atol=1e-8)
        assert bool((got[kind][~keep[kind]] != 0).all())  # removed groups' scores still learn


def _params_by_kind(pruner):
    return {kind: [pruner.layers[n].group_scores for n in names] for kind, names in pruner._owners.items()}


def test_threshold_groups_rounds_per_layer_counts_and_keeps_the_best():
    model = tiny_bert(num_attention_heads=4)
    groups = find_structures(model, ["ffn"]).groups["ffn"]  # 2 layers x 64
    scores = torch.cat([torch.linspace(-1, 1, 64), torch.full((64,), -5.0)])
    keep = threshold_groups(groups, scores, threshold=0.5, round_to=8, floor=8)
    above = int((scores[:64] > 0.5).sum())  # 16 of layer 0
    assert int(keep[:64].sum()) == -(-above // 8) * 8 and bool(keep[:64][scores[:64] > 0.5].all())
    assert int(keep[64:].sum()) == 8  # the floor


@pytest.mark.parametrize("variant", ["hard", "soft"])
def test_trainer_run_then_export_gives_the_masked_function(tmp_path, variant):
    model = tiny_bert(num_attention_heads=4)
    options = {"final_lambda": 50.0, "final_threshold": 0.5} if variant == "soft" else {}
    pruner = StructuredMovementCallback(model, final_sparsity=0.5, start_step=2, end_step=10, variant=variant,
                                        round_to_ffn=8, score_lr=0.1, **options)
    make_trainer(tmp_path, model, callbacks=[pruner], max_steps=14, save_strategy="no").train()
    assert pruner.finalized and pruner.score_params() == []
    assert not any(hasattr(layer, "group_scores") for layer in pruner.layers.values())
    keep = pruner.group_keep()
    if variant == "hard":
        assert int(keep["heads"].sum()) == 4 and int(keep["ffn"].sum()) == 64
    else:
        assert int(keep["ffn"].sum()) < 128  # the penalty removed neurons
    assert all(n % 8 == 0 for n in keep["ffn"].view(2, 64).sum(dim=1).tolist())
    for name, layer in pruner.layers.items():  # removed groups are exact zeros, weights and biases
        assert bool((layer.weight[~layer.weight_mask] == 0).all()), name
    for name, bias_keep in pruner.bias_keep().items():
        assert bool((pruner.layers[name].bias[~bias_keep] == 0).all())
    x = torch.randint(0, model.config.vocab_size, (2, 7))
    model.eval()
    with torch.no_grad():
        masked = model(input_ids=x).logits
    export_structured_model(model, tmp_path / "out")
    small = load_pruned_model(tmp_path / "out")
    with torch.no_grad():
        torch.testing.assert_close(small(input_ids=x).logits, masked, rtol=1e-5, atol=1e-5)
    json.dumps(pruner.state_dict())


def test_registered_and_options_checked():
    pruner = make_pruning_callback(tiny_bert(), PruningConfig(method="structured_movement",
                                                              options={"variant": "soft", "final_lambda": 1.0}))
    assert isinstance(pruner, StructuredMovementCallback) and pruner.variant == "soft"
    with pytest.raises(ValueError, match="structured movement options: final_threshold must be in"):
        PruningConfig(method="structured_movement", options={"final_threshold": 1.5})
    with pytest.raises(ValueError, match="pattern must be unstructured"):
        StructuredMovementCallback(tiny_bert(), pattern="2:4")


def test_resume_equals_the_uninterrupted_run(tmp_path):
    from test_structured import StopAt

    common = dict(max_steps=10, save_strategy="steps", save_steps=5, learning_rate=1e-3)
    sched = dict(final_sparsity=0.5, start_step=2, end_step=8, round_to_ffn=4, score_lr=0.05)
    full_model = tiny_bert(num_attention_heads=4)
    full = StructuredMovementCallback(full_model, **sched)
    make_trainer(tmp_path / "full", full_model, [full], **common).train()
    part_model = tiny_bert(num_attention_heads=4)
    make_trainer(tmp_path / "part", part_model, [StructuredMovementCallback(part_model, **sched), StopAt(7)],
                 **common).train()
    resumed_model = tiny_bert(seed=5, num_attention_heads=4)
    resumed = StructuredMovementCallback(resumed_model, **sched)
    make_trainer(tmp_path / "part", resumed_model, [resumed], **common).train(resume_from_checkpoint=True)
    for name, layer in full.layers.items():
        assert torch.equal(layer.weight_mask, resumed.layers[name].weight_mask), name
        torch.testing.assert_close(layer.weight, resumed.layers[name].weight, rtol=1e-5, atol=1e-6)
