"""results/index.{md,json}: one row per run from its metrics.json; recorded names equal their folders."""

import json
import os

from study.index import build_index, index_markdown, name_mismatches, parse_command, write_index

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(root, folder, **metrics):
    path = root / folder
    path.mkdir(parents=True)
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def test_parse_command_keeps_the_recipe_and_the_overrides_that_change_results():
    recipe, overrides = parse_command(
        ".venv/bin/prune-trainer run recipes/obert_90.yaml --set training.learning_rate=2e-4 --name obert_90_lr2e-4 "
        "--results-dir results --set training.disable_tqdm=true")
    assert recipe == "recipes/obert_90.yaml" and overrides == ["training.learning_rate=2e-4"]
    assert parse_command("") == (None, [])


def test_index_rows_superseded_runs_and_markdown(tmp_path):
    cfg = {"training": {"num_train_epochs": 3}}
    _run(tmp_path, "runs/dense", name="dense", eval_f1=0.9, sparsity=0.0, config=cfg,
         command="prune-trainer run recipes/dense.yaml")
    _run(tmp_path, "runs/obert_90", name="obert_90", eval_f1=0.882, sparsity=0.9, config=cfg,
         command="prune-trainer run recipes/obert_90.yaml --set training.learning_rate=2e-4")
    _run(tmp_path, "ablations/obert_90_lr1e-4", name="obert_90_lr1e-4", eval_f1=0.873, sparsity=0.9, config=cfg,
         renamed_from="obert_90 (the recipe at its former learning rate)",
         command="prune-trainer run recipes/obert_90.yaml")
    _run(tmp_path, "ablations/magnitude_80", name="magnitude_80", eval_f1=0.8, sparsity=0.8,
         config={"training": {"max_steps": 10}}, renamed_from="magnitude_x (no such run)",
         command="prune-trainer run recipes/magnitude_90.yaml --set pruning.schedule.final_sparsity=0.8")
    entries = {e["run"]: e for e in build_index(tmp_path)}
    old = entries["obert_90_lr1e-4"]
    assert old["superseded_by"] == "obert_90" and old["folder"] == "ablations/obert_90_lr1e-4"
    assert old["pct_of_dense"] == 97.0 and old["epochs"] == 3 and old["overrides"] == []
    assert entries["obert_90"]["superseded_by"] is None  # canonical runs are never superseded
    assert entries["magnitude_80"]["superseded_by"] is None and entries["magnitude_80"]["epochs"] is None
    assert entries["magnitude_80"]["overrides"] == ["pruning.schedule.final_sparsity=0.8"]
    md = index_markdown(list(entries.values()))
    rows = [line for line in md.splitlines() if line.startswith("| [")]
    assert rows[0].startswith("| [dense](runs/dense/)")  # shipped recipes' runs first
    assert ("| [obert_90_lr1e-4](ablations/obert_90_lr1e-4/) | recipes/obert_90.yaml | - | 3 | 0.8730 | 97.0 | "
            "0.9000 | [obert_90](runs/obert_90/) |") in rows
    paths = write_index(tmp_path)
    assert json.loads(paths[0].read_text()) == build_index(tmp_path) and paths[1].read_text() == md


def test_name_mismatches_finds_every_recorded_name_that_is_not_the_folder(tmp_path):
    run = _run(tmp_path, "runs/movement_soft_97", name="movement_soft_97", eval_f1=0.8,
               config={"name": "movement_soft_90"})
    (run / "config.yaml").write_text("name: movement_soft_90\nmodel: embedded\n")
    _run(tmp_path, "ablations/ok", name="ok", eval_f1=0.8, config={"name": "ok"})
    assert name_mismatches(tmp_path) == [f"{run / 'metrics.json'}: config.name = movement_soft_90",
                                         f"{run / 'config.yaml'}: name = movement_soft_90"]


def test_committed_results_names_and_index_are_consistent():
    results = os.path.join(ROOT, "results")
    assert name_mismatches(results) == []
    with open(os.path.join(results, "index.json")) as f:
        assert json.load(f) == build_index(results)  # regenerate with `python -m study report`
