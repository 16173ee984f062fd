"""Pruning composes with LoRA (PEFT): adapters are never targets, the merged model keeps the base zeros exactly."""

import pytest
import torch

from prune_trainer.masking import inject_masked_layers, unwrap_masked_layers
from prune_trainer.masking.inject import find_target_linears
from prune_trainer.oneshot.magnitude import magnitude_prune
from tests.test_llm_text import tiny_llama

peft = pytest.importorskip("peft")

from prune_trainer.llm.lora import lora_base_masks, mask_lora_updates, merge_lora_keep_mask  # noqa: E402

TARGETS = (r"layers\.\d+\.",)


def pruned_lora_model(seed: int = 0, sparsity: float = 0.5):
    """Tiny Llama with every block Linear magnitude-pruned to ``sparsity`` (zeros baked in), then LoRA on all of
    them with random (non-zero) B so the adapter delta is dense."""
    model = tiny_llama(seed)
    with torch.no_grad():
        for name in find_target_linears(model, TARGETS, ()):
            lin = model.get_submodule(name)
            lin.weight.copy_(magnitude_prune(lin.weight, None, sparsity)[0])
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(model, cfg)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def block_sparsity(model) -> float:
    weights = [model.get_submodule(n).weight for n in find_target_linears(model, TARGETS, ())]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def test_adapters_are_never_targets():
    model = pruned_lora_model()
    names = find_target_linears(model, TARGETS, ())
    assert names and all(n.endswith(".base_layer") for n in names)
    assert not any("lora_" in n for n in names)
    assert find_target_linears(model) == names  # the Llama family preset, found through the PEFT wrapper


def test_plain_merge_loses_sparsity_and_keep_mask_merge_keeps_it_exactly():
    plain = pruned_lora_model().merge_and_unload()
    assert block_sparsity(plain) < 0.01  # the dense LoRA delta fills the pruned positions
    model = pruned_lora_model()
    masks = lora_base_masks(model)
    deltas = {n: layer.get_delta_weight("default").clone() for n, layer in model.named_modules() if n in masks}
    bases = {n: model.get_submodule(n).get_base_layer().weight.clone() for n in masks}
    merged = merge_lora_keep_mask(model)
    assert block_sparsity(merged) == pytest.approx(0.5)
    for name, keep in masks.items():
        w = merged.get_submodule(name.removeprefix("base_model.model."))
        assert isinstance(w, torch.nn.Linear) and torch.equal(w.weight == 0, ~keep)
        torch.testing.assert_close(w.weight, bases[name] + keep * deltas[name])  # W + M ⊙ ΔW


def test_masked_updates_make_the_merge_exact_and_keep_masked_linear_masks():
    model = pruned_lora_model(1)
    layers = inject_masked_layers(model, TARGETS, ())  # training-time masks on the base layers
    assert layers and all(n.endswith(".base_layer") for n in layers)
    with torch.no_grad():
        for layer in layers.values():  # what a pruning callback does: the mask of the pruned weights
            layer.weight_mask.copy_(layer.weight != 0)
    mask_lora_updates(model)
    x = torch.randint(0, 40, (2, 9))
    with torch.no_grad():
        before = model(input_ids=x).logits
    merged = unwrap_masked_layers(merge_lora_keep_mask(model))
    assert block_sparsity(merged) == pytest.approx(0.5)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, before, rtol=1e-4, atol=1e-5)
    loss = pruned_lora_model(1)
    mask_lora_updates(loss)
    out = loss(input_ids=x, labels=x).loss
    out.backward()  # the masked forward trains the adapters
    grads = [p.grad for n, p in loss.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_no_lora_layers_is_an_error():
    with pytest.raises(ValueError, match="no LoRA layers"):
        lora_base_masks(tiny_llama())
