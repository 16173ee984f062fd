"""Whole-sublayer removal: a layer may lose all its heads or FFN neurons (``remove_sublayers``); the export
replaces the emptied attention / FFN with constant-output modules and the reload rebuilds them."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import make_trainer, tiny_bert
from test_structured import StopAt, other_families, perturbed, shapes, tiny_llama
from torch import nn

from prune_trainer import PruningConfig, StructuredPruningCallback, export_structured_model, load_pruned_model
from prune_trainer.export.sublayers import BiasOnly, RemovedAttention, ZeroWidth, linear_weight_count
from prune_trainer.structures import element_masks, find_structures


def empty_layers(model, heads_layer: int, ffn_layer: int, **options) -> StructuredPruningCallback:
    """Mask every head of ``heads_layer`` and every FFN neuron of ``ffn_layer`` (and ~30% of the others)."""
    pruner = StructuredPruningCallback(model, round_to_ffn=4, remove_sublayers=True, **options)
    rand = torch.Generator().manual_seed(0)
    for kind, layer in (("heads", heads_layer), ("ffn", ffn_layer)):
        groups = pruner.structures.groups[kind]
        keep = groups.group_layer != layer
        if kind == "ffn":
            keep &= torch.rand(groups.num_groups, generator=rand) < 0.7
        for name, mask in element_masks(groups, keep, shapes(model, groups)).items():
            pruner.layers[name].set_mask(mask)
    pruner.apply_bias_masks()
    return pruner


def export_and_reload(model, path, x):
    with torch.no_grad():
        masked = model(input_ids=x).logits
    sizes = export_structured_model(model, path)
    reloaded = load_pruned_model(path)
    with torch.no_grad():
        assert (reloaded(input_ids=x).logits - masked).abs().max() <= 1e-5
    return sizes, reloaded


def test_bert_emptied_attention_and_ffn_export_to_layernorm_of_input_plus_bias(tmp_path):
    model = perturbed(tiny_bert(num_attention_heads=4).eval())
    empty_layers(model, heads_layer=0, ffn_layer=1)
    sizes, reloaded = export_and_reload(model, tmp_path / "m", torch.randint(5, 30, (3, 12)))
    assert sizes["heads"] == [0, 4] and sizes["ffn"][1] == 0 and sizes["ffn"][0] > 0
    saved = json.loads((tmp_path / "m" / "config.json").read_text())["prune_trainer_structure"]
    assert saved == {**sizes, "uniform": False}
    layer0, layer1 = reloaded.bert.encoder.layer
    assert isinstance(layer0.attention.self, RemovedAttention) and isinstance(layer0.attention.output.dense, BiasOnly)
    assert not any(isinstance(m, nn.Linear) for m in layer0.attention.modules())  # no attention is computed
    assert isinstance(layer1.intermediate.dense, ZeroWidth) and isinstance(layer1.output.dense, BiasOnly)
    h = torch.randn(2, 5, 32)
    with torch.no_grad():  # post-norm: the emptied sublayers give LayerNorm(x + b)
        out = layer0.attention.output
        torch.testing.assert_close(layer0.attention(h)[0], out.LayerNorm(h + out.dense.bias))
        ffn = layer1.output
        torch.testing.assert_close(layer1.output(layer1.intermediate(h), h), ffn.LayerNorm(h + ffn.dense.bias))
    counts = {n: linear_weight_count(reloaded, n) for n in ("bert.encoder.layer.0.attention.self.query",
              "bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.1.intermediate.dense",
              "bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.0.intermediate.dense")}
    assert list(counts.values())[:3] == [0, 0, 0] and counts["bert.encoder.layer.1.attention.self.query"] == 32 * 32
    assert counts["bert.encoder.layer.0.intermediate.dense"] == sizes["ffn"][0] * 32
    bias = model.bert.encoder.layer[0].attention.output.dense.bias
    assert torch.equal(layer0.attention.output.dense.bias, bias) and bias.abs().sum() > 0


def test_llama_emptied_sublayers_export_reload_and_decode_with_a_cache(tmp_path):
    model = tiny_llama()
    empty_layers(model, heads_layer=0, ffn_layer=1)
    x = torch.randint(0, 100, (2, 10))
    masked_tokens = model.generate(x, max_new_tokens=4, do_sample=False)
    sizes, reloaded = export_and_reload(model, tmp_path / "m", x)
    assert sizes["heads"] == [0, 4] and sizes["ffn"][1] == 0
    layers = reloaded.model.layers
    assert isinstance(layers[0].self_attn, RemovedAttention) and layers[0].self_attn.output.bias is None
    assert isinstance(layers[1].mlp.gate_proj, ZeroWidth) and isinstance(layers[1].mlp.down_proj, BiasOnly)
    h = torch.randn(2, 5, 32)
    with torch.no_grad():  # pre-norm: an emptied sublayer adds its output bias (none here) to the residual
        assert torch.equal(layers[1].mlp(h), torch.zeros(2, 5, 32))
    assert torch.equal(reloaded.generate(x, max_new_tokens=4, do_sample=False), masked_tokens)
    with torch.no_grad():  # the cache keeps its length through layer 0's removed attention: positions stay right
        cache = reloaded(input_ids=x[:, :-1], use_cache=True).past_key_values
        assert cache.get_seq_length() == 9
        step = reloaded(input_ids=x[:, -1:], past_key_values=cache).logits[:, -1]
        assert (step - reloaded(input_ids=x).logits[:, -1]).abs().max() <= 1e-5


def test_without_remove_sublayers_no_layer_is_emptied_and_min_heads_0_is_refused():
    with pytest.raises(ValueError, match="removing every head of a layer needs remove_sublayers: true"):
        StructuredPruningCallback(tiny_bert(num_attention_heads=4), min_heads=0)
    with pytest.raises(ValueError, match="min_heads must be >= 1"):
        PruningConfig(method="structured_movement", options={"min_heads": 0})
    with pytest.raises(ValueError, match="min_heads"):
        PruningConfig(method="structured", options={"remove_sublayers": True, "min_heads": -1})
    with pytest.raises(ValueError, match="remove_sublayers"):
        PruningConfig(method="structured", options={"remove_sublayers": "yes"})
    for remove, heads_min, ffn_min in ((False, 1, 8), (True, 0, 0)):
        model = tiny_bert(num_attention_heads=4)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "layer.0." in name:
                    p.mul_(0.01)  # layer 0's groups score lowest everywhere
        pruner = StructuredPruningCallback(model, remove_sublayers=remove)
        pruner.prune(0, target=0.6)
        keep = pruner.group_keep()
        assert int(keep["heads"][:4].sum()) == heads_min and int(keep["ffn"][:64].sum()) == ffn_min
    assert StructuredPruningCallback(tiny_bert(), remove_sublayers=True, min_heads=2).floors["heads"] == (1, 2)


def test_resume_with_removed_sublayers_equals_the_uninterrupted_run(tmp_path):
    common = dict(max_steps=12, save_strategy="steps", save_steps=5, learning_rate=1e-3)
    sched = dict(final_sparsity=0.5, start_step=2, end_step=10, frequency=4, round_to_ffn=4, remove_sublayers=True)

    def model_with_weak_layers(seed: int = 0):
        model = tiny_bert(seed=seed, num_attention_heads=4)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ("layer.1.attention" in name or "layer.0.intermediate" in name or "layer.0.output.dense" in name):
                    p.mul_(0.01)  # layer 1's heads and layer 0's neurons go first
        return model

    full_model = model_with_weak_layers()
    full = StructuredPruningCallback(full_model, **sched)
    make_trainer(tmp_path / "full", full_model, [full], **common).train()
    part_model = model_with_weak_layers()
    make_trainer(tmp_path / "part", part_model, [StructuredPruningCallback(part_model, **sched), StopAt(7)],
                 **common).train()
    resumed_model = model_with_weak_layers(seed=5)
    resumed = StructuredPruningCallback(resumed_model, **sched)
    make_trainer(tmp_path / "part", resumed_model, [resumed], **common).train(resume_from_checkpoint=True)
    keep = resumed.group_keep()
    assert keep["heads"].view(2, 4).sum(1).tolist() == [4, 0] and keep["ffn"].view(2, 64).sum(1).tolist() == [0, 64]
    for name, layer in full.layers.items():
        assert torch.equal(layer.weight_mask, resumed.layers[name].weight_mask), name
    resumed_model.eval()
    sizes, _ = export_and_reload(resumed_model, tmp_path / "m", torch.randint(5, 30, (3, 12)))
    assert sizes == {"heads": [4, 0], "ffn": [0, 64]}


def test_recipe_run_removes_whole_sublayers_measures_and_benches_the_export(tmp_path, conll_dir):
    import yaml
    from helpers import tiny_tokenizer

    from prune_trainer.cli import main

    model_dir = tmp_path / "tiny4"
    tiny_bert(num_attention_heads=4, intermediate_size=64).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    recipe = {  # whole-layer blocks (round_to = layer size): half of each kind = one layer's sublayer
        "name": "tiny_sublayers", "model": str(model_dir), "data": {"max_length": 32, "data_dir": str(conll_dir)},
        "training": {"max_steps": 4, "per_device_train_batch_size": 8, "logging_steps": 2, "eval_strategy": "no",
                     "save_strategy": "no", "use_cpu": True, "disable_tqdm": True},
        "pruning": {"method": "structured", "schedule": {"final_sparsity": 0.5, "start_step": 1, "end_step": 2,
                                                         "frequency": 1},
                    "options": {"remove_sublayers": True, "round_to_heads": 4, "round_to_ffn": 64}},
        "bench": {"batch_sizes": [1], "threads": [1], "seq_len": 16, "rounds": 1, "reps": 1},
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["run", str(tmp_path / "r.yaml"), "--results-dir", str(tmp_path / "results")]) == 0
    metrics = json.loads((tmp_path / "results" / "tiny_sublayers" / "metrics.json").read_text())
    assert sorted(metrics["structure"]["heads"]) == [0, 4] and sorted(metrics["structure"]["ffn"]) == [0, 64]
    assert metrics["sparsity"] == pytest.approx(0.5, abs=1e-9) and metrics["speedup_cpu_b1"] > 0


def test_hard_structured_movement_may_empty_a_layer_with_remove_sublayers(tmp_path):
    from prune_trainer import StructuredMovementCallback

    model = perturbed(tiny_bert(num_attention_heads=4).eval())
    pruner = StructuredMovementCallback(model, remove_sublayers=True, round_to_ffn=8)
    with torch.no_grad():
        for param in pruner.score_params():  # layer 0's heads and neurons score lowest
            param.fill_(-5.0 if ".layer.0." in next(n for n, p in model.named_parameters() if p is param) else 5.0)
    pruner.prune(0, target=0.5)
    keep = pruner.group_keep()
    assert keep["heads"].view(2, 4).sum(1).tolist() == [0, 4] and keep["ffn"].view(2, 64).sum(1).tolist() == [0, 64]
    pruner.freeze_masks()
    sizes, reloaded = export_and_reload(model, tmp_path / "m", torch.randint(5, 30, (3, 12)))
    assert sizes == {"heads": [0, 4], "ffn": [0, 64]}
    layer0 = reloaded.bert.encoder.layer[0]
    assert isinstance(layer0.attention.self, RemovedAttention) and isinstance(layer0.intermediate.dense, ZeroWidth)
    with pytest.raises(ValueError, match=r"layer.0.attention.self \(RemovedAttention\) has no heads \(a sublayer"):
        find_structures(reloaded)


@pytest.mark.parametrize("make", other_families(), ids=["distilbert", "roberta", "qwen2", "mistral", "deberta-v2",
                                                        "deberta-v2-shared", "modernbert", "modernbert-sdpa"])
def test_every_family_exports_emptied_sublayers_to_the_masked_function(make, tmp_path):
    torch.manual_seed(0)
    model = perturbed(make().eval())  # non-zero output biases everywhere
    empty_layers(model, heads_layer=0, ffn_layer=1)
    sizes, reloaded = export_and_reload(model, tmp_path / "m", torch.randint(3, 100, (2, 10)))
    assert sizes["heads"][0] == 0 and sizes["ffn"][1] == 0 and type(reloaded) is type(model)
    assert sum(isinstance(m, RemovedAttention) for m in reloaded.modules()) == 1
