import json
import os

import pytest
import torch
import yaml
from helpers import tiny_bert_config, tiny_tokenizer
from transformers import BertModel

from prune_trainer.cli import main
from prune_trainer.recipes.runner import load_recipe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _recipe(tmp_path, **pruning):
    recipe = {
        "name": "tiny_magnitude",
        "data": {"max_length": 32},
        "training": {"max_steps": 12, "per_device_train_batch_size": 8, "learning_rate": 5e-3, "logging_steps": 4,
                     "eval_strategy": "no", "save_steps": 6, "use_cpu": True, "disable_tqdm": True},
        "pruning": {"method": "magnitude", "schedule": {"final_sparsity": 0.5, "end_step": 0.5, "frequency": 2,
                                                        **pruning}},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_shipped_recipes_parse():
    import glob

    paths = sorted(glob.glob(os.path.join(ROOT, "recipes", "*.yaml")))
    names = {os.path.basename(p)[: -len(".yaml")] for p in paths}
    assert {"dense", "magnitude_90", "llm_magnitude_50", "llm_recover_2of4"} <= names
    for path in paths:  # every shipped recipe is valid (keys, types, TrainingArguments, pruning config)
        recipe = load_recipe(path)
        assert recipe["name"] == os.path.basename(path)[: -len(".yaml")]
    lm = load_recipe(os.path.join(ROOT, "recipes", "llm_recover_2of4.yaml"))
    assert lm.task == "causal-lm" and lm.pruning["options"] == {"masks": "zeros"}


def test_cli_run_writes_results(tmp_path, tiny_model_dir, conll_dir, capsys):
    path = _recipe(tmp_path)
    rc = main(["run", str(path), "--model", str(tiny_model_dir), "--data-dir", str(conll_dir),
               "--results-dir", str(tmp_path / "results")])
    assert rc == 0
    out_dir = tmp_path / "results" / "tiny_magnitude"
    metrics = json.loads((out_dir / "metrics.json").read_text())
    for key in ("eval_f1", "sparsity", "wall_time_s", "git_commit", "config", "device"):
        assert key in metrics
    assert abs(metrics["sparsity"] - 0.5) < 1e-3
    assert (out_dir / "model" / "sparsity.json").is_file()
    assert (out_dir / "README.md").read_text().startswith("# tiny_magnitude")
    printed = capsys.readouterr().out
    assert "eval_f1=" in printed and "sparsity=0.5000" in printed


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "pruning.schedule.final_sparsity=1.2"], "final_sparsity must be a number in [0, 1), got 1.2"),
        (["--set", "pruning.method=lottery"], "unknown pruning method 'lottery'"),
        (["--set", "pruning.targets=[nothing_matches]"], "match no nn.Linear"),
        (["--set", "pruning.pattern=2:5"], "does not divide"),
        (["--data-dir", "/nonexistent/conll"], "'/nonexistent/conll' does not exist"),
        (["--model", "/nonexistent/model"], "model '/nonexistent/model': no such directory"),
        (["--set", "init_from=/nonexistent/dense/model"], "`prune-trainer run recipes/dense.yaml`"),
        (["--set", "training.learnin_rate=0.1"], "unknown key 'learnin_rate'; did you mean 'learning_rate'"),
        (["--set", "training.learning_rate=abc"], "training.learning_rate = 'abc' is not a valid float"),
        (["--set", "training.per_device_train_batch_size=0"], "per_device_train_batch_size must be at least 1"),
        (["--set", "training.eval_strategy=sometimes"], "training: sometimes is not a valid IntervalStrategy"),
        (["--set", "pruning.schedule.start_step=10", "--set", "pruning.schedule.end_step=5"],
         "end_step 5 is before start_step 10"),
        (["--set", "pruning.schedule.end_step=50"], "end_step=50 is past the run's last step (max_steps=12"),
        (["--set", "training.load_best_model_at_end=true", "--set", "training.eval_strategy=steps",
          "--set", "training.eval_steps=6"], "load_best_model_at_end cannot be used with pruning"),
        (["--set", "data.max_length=100"], "max_length=100 is above the model's max_position_embeddings=64"),
        (["--set", "data.max_lenght=16"], "unknown key 'max_lenght'; did you mean 'max_length'"),
        (["--set", "on_nonfinite=ignore"], "on_nonfinite must be one of"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path, tiny_model_dir, conll_dir, capsys, args, message):
    path = _recipe(tmp_path)
    argv = ["run", str(path), "--model", str(tiny_model_dir), "--results-dir", str(tmp_path / "results")]
    if "--data-dir" not in args:
        argv += ["--data-dir", str(conll_dir)]
    rc = main(argv + args)
    assert rc == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_unknown_recipe_key_is_an_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\ntrainig: {}\n")
    with pytest.raises(ValueError, match="unknown key 'trainig'; did you mean 'training'.*allowed: bench, data, "):
        load_recipe(path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: x\ntraining: {learning_rate: 1e-4\n", r"bad\.yaml:3:1: YAML syntax error"),
        ("name: x\ntraining:\n  seed: 1\n   bad: 2\n", r"bad\.yaml:4:\d+: YAML syntax error"),
        ("name: x\ntraining: 5\n", "'training' must be a mapping of TrainingArguments fields, got int 5"),
        ("name: x\ndata: [1]\n", "'data' must be a mapping, got list"),
    ],
)
def test_malformed_recipe_is_a_clear_error_naming_the_file(tmp_path, capsys, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_recipe(path)
    assert main(["run", str(path), "--results-dir", str(tmp_path / "results")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prune-trainer: error: ") and "Traceback" not in err
    assert not (tmp_path / "results").exists()


def test_bad_model_checkpoints_are_clear_errors_before_anything_is_written(tmp_path, conll_dir, capsys):
    from helpers import tiny_bert

    five = tmp_path / "five-labels"
    tiny_bert(num_labels=5, id2label={i: str(i) for i in range(5)}, label2id={str(i): i for i in range(5)}
              ).save_pretrained(five)
    tiny_tokenizer().save_pretrained(five)
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps(tiny_bert_config().to_dict()))
    path = _recipe(tmp_path)
    for model, message in ((five, "has a classifier with 5 labels (BertForTokenClassification); CoNLL-2003 needs 9"),
                           (no_weights, "holds no model weights")):
        rc = main(["run", str(path), "--model", str(model), "--data-dir", str(conll_dir),
                   "--results-dir", str(tmp_path / "results")])
        assert rc == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "results").exists()


def test_empty_train_split_is_a_clear_error(tmp_path, tiny_model_dir, conll_dir, capsys):
    (conll_dir / "train.txt").write_text("-DOCSTART- -X- -X- O\n\n")
    rc = main(["run", str(_recipe(tmp_path)), "--model", str(tiny_model_dir), "--data-dir", str(conll_dir),
               "--results-dir", str(tmp_path / "results")])
    assert rc == 2
    assert f"{conll_dir / 'train.txt'}: the train split holds no sentence" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_epoch_based_length_is_computed_as_the_trainer_does_and_flags_are_taken_literally(
    tmp_path, tiny_model_dir, conll_dir, capsys
):
    """64 sentences, batch 8, accumulation 3, 2 epochs: ⌈8 / 3⌉ = 3 updates per epoch, 6 steps; end_step 7 is past
    the end. ``--name yes`` is the string 'yes' (a YAML override would read it as True)."""
    path = _recipe(tmp_path)
    argv = ["run", str(path), "--model", str(tiny_model_dir), "--data-dir", str(conll_dir), "--name", "yes",
            "--results-dir", str(tmp_path / "results"), "--set", "training.max_steps=-1",
            "--set", "training.num_train_epochs=2", "--set", "training.gradient_accumulation_steps=3"]
    assert main(argv + ["--set", "pruning.schedule.end_step=7"]) == 2
    assert "end_step=7 is past the run's last step (max_steps=6, from 64 sentences" in capsys.readouterr().err
    assert main(argv + ["--set", "pruning.schedule.end_step=6"]) == 0
    metrics = json.loads((tmp_path / "results" / "yes" / "metrics.json").read_text())
    assert metrics["name"] == "yes" and metrics["train_steps"] == 6


def test_factorize_embeddings_trains_low_rank_and_exports_a_plain_bert(tmp_path, tiny_model_dir, conll_dir):
    import torch
    from transformers import AutoModelForTokenClassification

    path = _recipe(tmp_path)
    rc = main(["run", str(path), "--model", str(tiny_model_dir), "--data-dir", str(conll_dir),
               "--results-dir", str(tmp_path / "results"), "--set", "factorize_embeddings=4"])
    assert rc == 0
    out_dir = tmp_path / "results" / "tiny_magnitude"
    assert json.loads((out_dir / "metrics.json").read_text())["config"]["factorize_embeddings"] == 4
    model = AutoModelForTokenClassification.from_pretrained(out_dir / "model")  # plain BERT keys, no inner/proj
    emb = model.get_input_embeddings()
    assert type(emb) is torch.nn.Embedding
    assert int(torch.linalg.matrix_rank(emb.weight.detach().double(), rtol=1e-5)) <= 4  # float32 round-off


@pytest.mark.parametrize("rank", ["two", 0, True])
def test_bad_factorize_embeddings_rank_is_a_clear_error(tmp_path, tiny_model_dir, conll_dir, capsys, rank):
    path = _recipe(tmp_path)
    rc = main(["run", str(path), "--model", str(tiny_model_dir), "--data-dir", str(conll_dir),
               "--results-dir", str(tmp_path / "results"), "--set", f"factorize_embeddings={str(rank).lower()}"])
    assert rc == 2
    assert "rank" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_exponent_floats_are_floats_in_recipes_and_overrides(tmp_path):
    """YAML 1.1 reads ``2e-4`` as a string; recipes, ``--set`` values and pruning configs read it as a float."""
    from prune_trainer.config import PruningConfig
    from prune_trainer.yaml_io import load_yaml

    assert load_yaml("[2e-4, 1E5, 1.0e4, .5e-3, -3e+2, 0.5, 12, e5, 2.5e, abc]") == [
        2e-4, 1e5, 1e4, 5e-4, -300.0, 0.5, 12, "e5", "2.5e", "abc"]
    path = tmp_path / "r.yaml"
    path.write_text("name: r\ntraining: {learning_rate: 3e-5}\npruning: {pattern: '2:4', schedule: {}}\n")
    recipe = load_recipe(path, ["training.weight_decay=1e-2", "pruning.schedule.final_sparsity=9e-1",
                                "pruning.pattern=2:4"])
    assert recipe["training"] == {"learning_rate": 3e-5, "weight_decay": 0.01}
    assert isinstance(recipe["training"]["learning_rate"], float)
    assert recipe["pruning"]["schedule"] == {"final_sparsity": 0.9} and recipe["pruning"]["pattern"] == "2:4"
    assert PruningConfig.from_yaml("min_kept_fraction: 1e-2").min_kept_fraction == 0.01


def test_runs_are_reproducible_when_the_checkpoint_has_no_task_head(tmp_path, conll_dir):
    """A base checkpoint (no token-classification head, like the embedded model) gets a freshly initialised head;
    the runner seeds before loading it, so the same recipe gives the same run twice."""
    base = tmp_path / "tiny-base"
    BertModel(tiny_bert_config()).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    path = _recipe(tmp_path)
    losses = []
    for run in ("a", "b"):
        torch.manual_seed(ord(run))  # a different global RNG state before each run
        rc = main(["run", str(path), "--model", str(base), "--data-dir", str(conll_dir),
                   "--results-dir", str(tmp_path / run)])
        assert rc == 0
        metrics = json.loads((tmp_path / run / "tiny_magnitude" / "metrics.json").read_text())
        losses.append([row["loss"] for row in metrics["log_history"] if "loss" in row])
    assert losses[0] and losses[0] == losses[1]


@pytest.mark.parametrize("method", ["structured", "structured_movement"])
def test_structured_recipe_exports_a_smaller_model_and_benches_it(tmp_path, conll_dir, method):
    from helpers import tiny_bert

    from prune_trainer.export.structured import load_pruned_model

    model_dir = tmp_path / "tiny4"
    tiny_bert(num_attention_heads=4, intermediate_size=64).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    recipe = {
        "name": "tiny_structured",
        "model": str(model_dir),
        "data": {"max_length": 32, "data_dir": str(conll_dir)},
        "training": {"max_steps": 8, "per_device_train_batch_size": 8, "learning_rate": 5e-3, "logging_steps": 4,
                     "eval_strategy": "no", "save_steps": 4, "use_cpu": True, "disable_tqdm": True},
        "pruning": {"method": method, "schedule": {"final_sparsity": 0.5, "start_step": 1, "end_step": 4,
                                                   "frequency": 1},
                    "options": {"round_to_ffn": 8, **({"score": "taylor"} if method == "structured" else {})}},
        "bench": {"batch_sizes": [1, 2], "threads": [1], "seq_len": 16, "rounds": 1, "reps": 1},
    }
    path = tmp_path / "structured.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["run", str(path), "--results-dir", str(tmp_path / "results")]) == 0
    out = tmp_path / "results" / "tiny_structured"
    metrics = json.loads((out / "metrics.json").read_text())
    exported = load_pruned_model(out / "model")
    structure = metrics["structure"]
    recorded = json.loads((out / "model" / "config.json").read_text())["prune_trainer_structure"]
    assert structure == {k: recorded[k] for k in ("heads", "ffn")}
    assert sum(structure["heads"]) == 4 and sum(structure["ffn"]) == 64  # half of 2 layers x (4 heads, 64 neurons)
    # sparsity is measured on the export: the removed fraction of the coupled Linears' weights
    assert metrics["sparsity"] == pytest.approx(0.5, abs=1e-9)
    assert exported.bert.encoder.layer[0].intermediate.dense.out_features == structure["ffn"][0]
    assert metrics["params"] == sum(p.numel() for p in exported.parameters())
    assert metrics["params"] < metrics["baseline_params"] and 0 < metrics["model_mib"] < metrics["baseline_mib"]
    assert set(metrics) >= {"speedup_cpu_b1", "speedup_cpu_b2", "bench"}
    assert metrics["bench"]["baseline_dir"] == str(model_dir) and metrics["speedup_cpu_b1"] > 0
    assert not (out / "model" / "sparsity.json").exists()


def test_bad_bench_options_are_clear_errors(tmp_path):
    from prune_trainer.recipes.recipe import Recipe

    with pytest.raises(ValueError, match="bench.batch_sizes must be a non-empty list of positive integers"):
        Recipe.from_dict({"name": "x", "bench": {"batch_sizes": [0]}})
    with pytest.raises(ValueError, match="unknown key 'batch'"):
        Recipe.from_dict({"name": "x", "bench": {"batch": [1]}})
    with pytest.raises(ValueError, match="bench.modes must be values of"):
        Recipe.from_dict({"name": "x", "bench": {"modes": ["fast"]}})
