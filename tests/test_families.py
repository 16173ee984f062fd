"""Every supported family on tiny random configs: default targets, sequential calibration against a full forward,
SparseGPT through the runner against a non-sequential reference, export/reload, GPT-2's Conv1D round trip."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from family_models import FAMILIES, FAMILY_CONFIGS, tiny_batches, tiny_family_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from prune_trainer.export import export_pruned_model
from prune_trainer.families import MODEL_FAMILIES
from prune_trainer.masking.inject import find_target_linears, inject_masked_layers, unwrap_masked_layers
from prune_trainer.masking.masked_linear import MaskedConv1D
from prune_trainer.oneshot.base import LayerStats
from prune_trainer.oneshot.calibration import prune_sequential, weight_out_in
from prune_trainer.oneshot.registry import OneShotMethod, get_method
from prune_trainer.oneshot.sparsegpt import sparsegpt_prune

HEAD_NAMES = re.compile(r"classifier|lm_head|pooler|embed|score|head\.|shared|wte|wpe|relative_attention_bias")


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def _rows(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The real-token rows of a Linear input (the layout rule the runner documents)."""
    if x.shape[:-1] == mask.shape:
        return x[mask]
    flat = x.reshape(-1, x.shape[-1])
    return flat[mask.reshape(-1)] if flat.shape[0] == mask.numel() else flat


@torch.no_grad()
def full_forward_stats(model: nn.Module, batches: list[dict], names: list[str]) -> dict[str, LayerStats]:
    """``X Xᵀ`` of every target's input over real tokens, from plain full-model forwards (no block replay)."""
    stats = {n: LayerStats.empty(weight_out_in(model.get_submodule(n)).shape[1], True) for n in names}
    current: dict[str, torch.Tensor] = {}

    def make_hook(name: str):
        def hook(module, args):
            cross = "EncDecAttention.k" in name or "EncDecAttention.v" in name
            key = "enc" if cross or not name.startswith("decoder.") else "dec"
            stats[name].add(_rows(args[0], current[key]))

        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(make_hook(n)) for n in names]
    try:
        for batch in batches:
            current["enc"] = batch["attention_mask"].bool()
            current["dec"] = batch.get("decoder_attention_mask", batch["attention_mask"]).bool()
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return stats


def _keep_all_recorder(seen: dict[int, LayerStats]) -> OneShotMethod:
    def prune(weight, stats, sparsity, prunen=0, prunem=0):
        seen[weight.data_ptr()] = stats
        return weight.clone(), torch.ones_like(weight, dtype=torch.bool)

    return OneShotMethod("record", prune, needs_hessian=True)


def test_every_family_in_the_table_has_a_test_config():
    tested = {FAMILY_CONFIGS[f][0].model_type for f in FAMILIES}
    assert set(MODEL_FAMILIES) - tested <= {"xlm-roberta"}  # same modules as roberta


@pytest.mark.parametrize("family", FAMILIES)
def test_default_targets_are_every_linear_inside_the_blocks(family):
    model = tiny_family_model(family)
    names = find_target_linears(model)
    expected = [n for n in _linear_names(model) if not HEAD_NAMES.search(n) and "pos_key_proj" not in n
                and "pos_query_proj" not in n and not n.startswith(("model.head", "head"))]
    assert names == expected and len(names) >= 8


def test_unknown_family_without_targets_lists_the_linears():
    model = tiny_family_model("bert")
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match=r"model_type 'mystery'.*bert\.encoder\.layer\.0\.attention\.self\.query"):
        find_target_linears(model)
    assert find_target_linears(model, targets=[r"\.query$"]) == [
        "bert.encoder.layer.0.attention.self.query", "bert.encoder.layer.1.attention.self.query"]


@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_calibration_equals_a_full_forward(family):
    """Every target's inputs, block by block through the runner (each block re-run with its own arguments, no
    cache), equal those of a plain forward of the whole model: block outputs equal, for every block and stack."""
    model = tiny_family_model(family)
    batches = tiny_batches(family)
    names = find_target_linears(model)
    reference = full_forward_stats(model, batches, names)
    seen: dict[int, LayerStats] = {}
    prune_sequential(model, batches, _keep_all_recorder(seen), 0.5, progress=False)
    for name in names:
        got = seen[weight_out_in(model.get_submodule(name)).data_ptr()]
        assert got.n_tokens == reference[name].n_tokens, name
        torch.testing.assert_close(got.xxt, reference[name].xxt, rtol=1e-5, atol=1e-6, msg=name)


@torch.no_grad()
def reference_sparsegpt(model: nn.Module, batches: list[dict], sparsity: float, prunen: int = 0, prunem: int = 0):
    """Non-sequential reference: for each block in turn, full-model forwards of the partly pruned model give its
    targets' statistics, then SparseGPT prunes them."""
    names = find_target_linears(model)
    groups: dict[str, list[str]] = {}
    for n in names:
        groups.setdefault(re.match(r"^(.*?\.\d+)\.", n).group(1), []).append(n)
    for group in groups.values():
        stats = full_forward_stats(model, batches, group)
        for n in group:
            module = model.get_submodule(n)
            w, keep = sparsegpt_prune(weight_out_in(module), stats[n], sparsity, prunen, prunem)
            weight_out_in(module).copy_(w * keep)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", ["0.5", "2:4"])
def test_sparsegpt_through_the_runner_equals_the_reference(family, pattern):
    prunen, prunem = (2, 4) if pattern == "2:4" else (0, 0)
    model = tiny_family_model(family)
    model.config.use_cache = False
    batches = tiny_batches(family)
    ref = copy.deepcopy(model)
    prune_sequential(model, batches, get_method("sparsegpt"), 0.5, prunen, prunem, progress=False)
    reference_sparsegpt(ref, batches, 0.5, prunen, prunem)
    for name in find_target_linears(model):
        got, want = model.get_submodule(name).weight, ref.get_submodule(name).weight
        assert torch.equal(got == 0, want == 0), name
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
        assert float((got == 0).float().mean()) == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("family", FAMILIES)
def test_export_and_reload_give_the_same_logits(family, tmp_path):
    model = tiny_family_model(family)
    batches = tiny_batches(family)
    prune_sequential(model, batches, get_method("wanda"), 0.5, progress=False)
    with torch.no_grad():
        before = model(**batches[0]).logits
    report = export_pruned_model(model, tmp_path / "m")
    assert report["global_sparsity"] == pytest.approx(0.5, abs=0.01)
    reloaded = FAMILY_CONFIGS[family][2].from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batches[0]).logits, before)


def test_conv1d_round_trip_mask_export_reload(tmp_path):
    model = tiny_family_model("gpt2")
    batch = tiny_batches("gpt2")[0]
    with torch.no_grad():
        dense = model(**batch).logits
    layers = inject_masked_layers(model)
    conv = layers["transformer.h.0.attn.c_attn"]
    assert isinstance(conv, MaskedConv1D) and conv.weight.shape == (48, 16)  # [out, in] in memory
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, dense)  # same forward as Conv1D
    state = model.state_dict()
    assert state["transformer.h.0.attn.c_attn.weight"].shape == (16, 48)  # Conv1D's own [in, out] on disk
    assert state["transformer.h.0.attn.c_attn.weight_mask"].shape == (16, 48)
    torch.manual_seed(1)
    masks = {n: torch.rand_like(layer.weight) > 0.5 for n, layer in layers.items()}
    for n, layer in layers.items():
        layer.set_mask(masks[n])
    with torch.no_grad():
        masked = model(**batch).logits
    copy_ = tiny_family_model("gpt2")
    inject_masked_layers(copy_)
    copy_.load_state_dict(model.state_dict())  # state dict round trip in the Conv1D layout
    torch.testing.assert_close(copy_.get_submodule("transformer.h.0.attn.c_attn").weight_mask, conv.weight_mask)
    export_pruned_model(model, tmp_path / "gpt2")
    reloaded = FAMILY_CONFIGS["gpt2"][2].from_pretrained(tmp_path / "gpt2").eval()
    for n, mask in masks.items():
        module = reloaded.get_submodule(n)
        assert type(module) is Conv1D
        assert torch.equal(module.weight == 0, ~mask.t())  # exact zeros where the mask is 0, in [in, out]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, masked)
    unwrap_masked_layers(copy_)
    assert type(copy_.get_submodule("transformer.h.1.mlp.c_fc")) is Conv1D


def test_conv1d_training_callback_prunes_and_keeps_zeros():
    from prune_trainer.callbacks.magnitude import MagnitudePruningCallback
    from prune_trainer.callbacks.nm import NMSparsityCallback

    model = tiny_family_model("gpt2")
    pruner = MagnitudePruningCallback(model, final_sparsity=0.5, start_step=0, end_step=1, frequency=1)
    pruner.prune(1)
    assert pruner.sparsity()[0] == pytest.approx(0.5, abs=0.01)
    model = tiny_family_model("gpt2")
    nm = NMSparsityCallback(model, pattern="2:4")
    nm.prune(0, target=0.5)
    for layer in nm.layers.values():  # 2 of every 4 consecutive inputs of each output (Conv1D rows are inputs)
        kept = layer.weight_mask.reshape(layer.out_features, -1, 4).sum(-1)
        assert (kept == 2).all()


def test_conv1d_trainer_run_keeps_zeros_and_resumes_to_the_same_masks(tmp_path):
    """A Trainer run on GPT-2 (Conv1D) with a pruning callback: zeros stay exact through optimizer steps and a
    resume from a checkpoint (saved in the Conv1D layout) reaches the uninterrupted run's masks and weights."""
    from helpers import make_trainer
    from transformers import GPT2Config, GPT2ForTokenClassification

    from prune_trainer.callbacks.magnitude import MagnitudePruningCallback

    def run(out, resume=None):
        torch.manual_seed(0)
        model = GPT2ForTokenClassification(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2, n_positions=64,
                                                      num_labels=9, pad_token_id=0))
        pruner = MagnitudePruningCallback(model, final_sparsity=0.6, start_step=0, end_step=4, frequency=2)
        trainer = make_trainer(out, model, [pruner], max_steps=6, save_strategy="steps", save_steps=3)
        trainer.train(resume_from_checkpoint=resume)
        return model, pruner

    full, pruner = run(tmp_path / "a")
    assert pruner.sparsity()[0] == pytest.approx(0.6, abs=0.01)
    for layer in pruner.layers.values():
        assert isinstance(layer, MaskedConv1D) and (layer.weight[~layer.weight_mask] == 0).all()
    resumed, _ = run(tmp_path / "a", resume=str(tmp_path / "a" / "checkpoint-3"))
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
