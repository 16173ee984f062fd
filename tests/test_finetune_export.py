"""Fine-tuning a physically pruned (structured) export with a recipe: loading, fixed-structure and further
structured training, the export's sizes and logits, the bench baseline, and the refused cases."""

import json
import os

import pytest
import torch
import yaml
from helpers import tiny_bert, tiny_tokenizer

from prune_trainer.cli import main
from prune_trainer.export import export_pruned_model
from prune_trainer.export.structured import export_structured_model, load_pruned_model
from prune_trainer.models import load_model_and_tokenizer, pruned_export_kind
from prune_trainer.recipes.runner import load_recipe, run_recipe
from prune_trainer.structures import element_masks, find_structures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _zero_groups(model, keep_by_kind):
    """Zero the coupled weights of the groups not kept (what the pruning masks do)."""
    structures = find_structures(model)
    with torch.no_grad():
        for kind, keep in keep_by_kind.items():
            groups = structures.groups[kind]
            shapes = {lin.name: model.get_submodule(lin.name).weight.shape for lin in groups.linears}
            for name, mask in element_masks(groups, keep, shapes).items():
                model.get_submodule(name).weight.mul_(mask)


@pytest.fixture
def dense_and_pruned(tmp_path):
    """A tiny dense tagger (4 heads, 64 neurons per layer) and its structured export keeping 1 and 3 heads and
    uneven FFN widths (no sublayer removed)."""
    dense_dir, pruned_dir = tmp_path / "dense", tmp_path / "pruned"
    tiny_bert(num_attention_heads=4).save_pretrained(dense_dir)
    tiny_tokenizer().save_pretrained(dense_dir)
    model = tiny_bert(num_attention_heads=4)
    heads = torch.tensor([False, True, False, False, True, True, False, True])
    ffn = torch.rand(128, generator=torch.Generator().manual_seed(0)) < 0.5
    _zero_groups(model, {"heads": heads, "ffn": ffn})
    sizes = export_structured_model(model, pruned_dir, tiny_tokenizer())
    assert sizes["heads"] == [1, 3] and len(set(sizes["ffn"])) == 2
    return dense_dir, pruned_dir, sizes


def _recipe(conll_dir, model, **extra):
    return {
        "name": "ft", "model": str(model), "data": {"max_length": 32, "data_dir": str(conll_dir)},
        "training": {"max_steps": 4, "per_device_train_batch_size": 8, "learning_rate": 5e-3, "logging_steps": 2,
                     "eval_strategy": "no", "save_steps": 4, "use_cpu": True, "disable_tqdm": True},
        **extra,
    }


def test_models_loader_builds_a_structured_export_at_its_sizes(dense_and_pruned):
    dense_dir, pruned_dir, sizes = dense_and_pruned
    assert pruned_export_kind(pruned_dir) == "structured" and pruned_export_kind(dense_dir) is None
    model, _ = load_model_and_tokenizer(pruned_dir)
    reference = load_pruned_model(pruned_dir)
    layers = model.bert.encoder.layer
    assert [layer.attention.self.num_attention_heads for layer in layers] == sizes["heads"]
    assert [layer.intermediate.dense.out_features for layer in layers] == sizes["ffn"]
    x = torch.randint(5, 30, (2, 9))
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=x).logits, reference(input_ids=x).logits)


def test_fixed_structure_finetune_with_distillation_keeps_sizes_and_logits(
    tmp_path, conll_dir, dense_and_pruned, capsys
):
    """pruning: null on a sliced start, logits + hidden-state distillation from the dense model, bench against
    the dense teacher by default: the export reloads with the same sizes and the trained model's logits."""
    dense_dir, pruned_dir, sizes = dense_and_pruned
    distill = {"teacher": str(dense_dir), "alpha": 0.5, "temperature": 2.0, "hidden_weight": 0.5}
    bench = {"batch_sizes": [1], "threads": [1], "seq_len": 16, "rounds": 1, "reps": 1}
    recipe = _recipe(conll_dir, pruned_dir, distillation=distill, bench=bench)
    start = load_pruned_model(pruned_dir)
    metrics = run_recipe(recipe, results_root=tmp_path / "results")
    out = tmp_path / "results" / "ft" / "model"
    exported = load_pruned_model(out)
    layers = exported.bert.encoder.layer
    assert [layer.attention.self.num_attention_heads for layer in layers] == sizes["heads"]
    assert [layer.intermediate.dense.out_features for layer in layers] == sizes["ffn"]
    assert metrics["structure"] == sizes and metrics["sparsity"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["params"] == metrics["start_params"] == sum(p.numel() for p in start.parameters())
    assert metrics["params"] < metrics["baseline_params"]  # the bench baseline is the dense teacher
    assert metrics["bench"]["baseline_dir"] == str(dense_dir) and metrics["speedup_cpu_b1"] > 0
    assert "distill/hidden_loss" in capsys.readouterr().out  # the sliced student's hidden states are distilled
    trained, _ = load_model_and_tokenizer(pruned_dir)
    trained.load_state_dict(exported.state_dict())  # same shapes: the trained weights fit the start structure
    changed = any(not torch.equal(a, b) for a, b in zip(exported.state_dict().values(), start.state_dict().values()))
    assert changed  # training happened
    x = torch.randint(5, 30, (2, 9))
    with torch.no_grad():
        assert torch.equal(exported(input_ids=x).logits, trained.eval()(input_ids=x).logits)


def test_export_logits_equal_the_in_memory_trained_model(tmp_path, conll_dir, dense_and_pruned, monkeypatch):
    """The exported folder computes exactly what the model held in memory at the end of training computes."""
    import prune_trainer.recipes.runner as runner

    dense_dir, pruned_dir, _ = dense_and_pruned
    seen = {}
    original = runner._evaluate_and_export

    def spy(run, trainer):
        x = torch.randint(5, 30, (2, 9))
        with torch.no_grad():
            seen["x"], seen["logits"] = x, run.model.eval()(input_ids=x).logits.clone()
        return original(run, trainer)

    monkeypatch.setattr(runner, "_evaluate_and_export", spy)
    run_recipe(_recipe(conll_dir, pruned_dir, distillation={"teacher": str(dense_dir)}),
               results_root=tmp_path / "results")
    exported = load_pruned_model(tmp_path / "results" / "ft" / "model")
    with torch.no_grad():
        assert torch.equal(exported(input_ids=seen["x"]).logits, seen["logits"])


def test_structured_pruning_on_top_of_a_structured_export(tmp_path, conll_dir, dense_and_pruned):
    """method: structured on a sliced start removes more groups; sparsity is relative to the start model."""
    _, pruned_dir, sizes = dense_and_pruned
    pruning = {"method": "structured", "schedule": {"final_sparsity": 0.5, "start_step": 1, "end_step": 3,
                                                    "frequency": 1},
               "options": {"structures": ["ffn"], "round_to_ffn": 4, "score": "taylor"}}
    metrics = run_recipe(_recipe(conll_dir, pruned_dir, pruning=pruning), results_root=tmp_path / "results")
    exported = load_pruned_model(tmp_path / "results" / "ft" / "model")
    ffn = [layer.intermediate.dense.out_features for layer in exported.bert.encoder.layer]
    assert ffn == metrics["structure"]["ffn"] and sum(ffn) < sum(sizes["ffn"])
    assert [layer.attention.self.num_attention_heads for layer in exported.bert.encoder.layer] == sizes["heads"]
    assert 0.2 < metrics["sparsity"] < 0.6 and metrics["params"] < metrics["start_params"]


def test_refused_starts_are_clear_errors_before_anything_is_written(tmp_path, conll_dir):
    model = tiny_bert(num_attention_heads=4)
    _zero_groups(model, {"heads": torch.tensor([False] * 4 + [True] * 4)})  # layer 0 loses its attention
    emptied = tmp_path / "emptied"
    export_structured_model(model, emptied, tiny_tokenizer())
    pruning = {"method": "structured", "schedule": {"final_sparsity": 0.3, "start_step": 1, "end_step": 3}}
    with pytest.raises(ValueError, match=r"removed whole sublayers \(heads of layers \[0\]\).*pruning: null"):
        run_recipe(_recipe(conll_dir, emptied, pruning=pruning), results_root=tmp_path / "results")
    compressed = tmp_path / "compressed"
    export_pruned_model(tiny_bert(), compressed, tiny_tokenizer(), quantize="int8")
    assert pruned_export_kind(compressed) == "compressed"
    with pytest.raises(ValueError, match="is a compressed export .* would not keep the compression"):
        run_recipe(_recipe(conll_dir, compressed), results_root=tmp_path / "results")
    assert not (tmp_path / "results").exists()
    teacher, _ = load_model_and_tokenizer(compressed)  # as a teacher it loads (decoded to float)
    assert teacher.classifier.out_features == 9


def test_finetune_recipe_documented_command_parses():
    recipe = load_recipe(os.path.join(ROOT, "recipes", "finetune_pruned.yaml"), ["distillation.teacher=/d/model"],
                         model="/x/model")
    assert recipe.model == "/x/model" and recipe.init_from is None and recipe.pruning is None
    assert recipe.distillation["teacher"] == "/d/model" and recipe.bench.baseline == "teacher"
    assert recipe.training["num_train_epochs"] == 1
    with pytest.raises(ValueError, match="bench.baseline is 'teacher' but the recipe has no distillation teacher"):
        load_recipe(os.path.join(ROOT, "recipes", "finetune_pruned.yaml"), ["distillation=null"])


def test_cli_fine_tunes_a_structured_export(tmp_path, conll_dir, dense_and_pruned):
    dense_dir, pruned_dir, sizes = dense_and_pruned
    path = tmp_path / "ft.yaml"
    path.write_text(yaml.safe_dump(_recipe(conll_dir, "unused", distillation={"teacher": "x"})))
    rc = main(["run", str(path), "--model", str(pruned_dir), "--set", f"distillation.teacher={dense_dir}",
               "--results-dir", str(tmp_path / "results")])
    assert rc == 0
    config = json.loads((tmp_path / "results" / "ft" / "model" / "config.json").read_text())
    assert {k: config["prune_trainer_structure"][k] for k in ("heads", "ffn")} == sizes
