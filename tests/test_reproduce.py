"""`python -m study reproduce`: plan order and statuses, skipping finished steps, a tiny end-to-end run, resuming."""

import json
import os
from pathlib import Path

import pytest
import yaml
from helpers import write_conll_dir

from study.cli import main
from study.oneshot_grid import setting_key
from study.reproduce import build_steps, in_process_executor, reproduce

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAINING = {"max_steps": 4, "per_device_train_batch_size": 8, "learning_rate": 5e-3, "logging_steps": 2,
            "eval_strategy": "no", "save_steps": 2, "save_total_limit": 2, "use_cpu": True, "disable_tqdm": True,
            "report_to": "none"}
PRUNING = {"method": "magnitude", "schedule": {"final_sparsity": 0.5, "start_step": 0, "end_step": 2, "frequency": 1}}


def _write_plan(tmp_path, model_dir, steps=None):
    """recipes/tiny_dense.yaml, recipes/tiny_pruned.yaml (from tiny_dense's model) and a plan over them."""
    recipes = tmp_path / "recipes"
    recipes.mkdir(exist_ok=True)
    base = {"model": str(model_dir), "data": {"max_length": 32}, "training": TRAINING}
    (recipes / "tiny_dense.yaml").write_text(yaml.safe_dump({"name": "tiny_dense", **base, "pruning": None}))
    (recipes / "tiny_pruned.yaml").write_text(yaml.safe_dump(
        {"name": "tiny_pruned", **base, "init_from": "results/tiny_dense/model", "pruning": PRUNING}))
    plan = recipes / "plan.yaml"
    steps = steps or [{"recipe": "tiny_dense.yaml"}, {"recipe": "tiny_pruned.yaml"}]
    plan.write_text(yaml.safe_dump({"estimates": {"min_per_epoch": 8, "train_sentences": 32}, "steps": steps}))
    return plan


FULL_STEPS = [
    {"recipe": "tiny_dense.yaml"},
    {"name": "oneshot_wanda", "oneshot": {"method": "wanda", "model_from": "tiny_dense", "levels": [0.5, "2:4"],
                                          "owl": "both", "calib": 16}},
    {"name": "oneshot_table", "oneshot_table": {"dir": "oneshot/tiny_dense", "md": "oneshot_table.md", "calib": 16}},
    {"recipe": "tiny_pruned.yaml"},
    {"name": "tiny_pruned_80", "recipe": "tiny_pruned.yaml", "set": ["pruning.schedule.final_sparsity=0.8"]},
    {"name": "report", "report": {}},
]


def _metrics(results, name, group="runs", **extra):
    (results / group / name).mkdir(parents=True, exist_ok=True)
    (results / group / name / "metrics.json").write_text(json.dumps({"name": name, "eval_f1": 0.5, **extra}))


def _fake_model(results, name):
    model = results / "runs" / name / "model"
    model.mkdir(parents=True, exist_ok=True)
    for file in ("config.json", "sparsity.json"):
        (model / file).write_text("{}")
    for file in ("model.safetensors", "vocab.txt"):
        (model / file).write_text("")


def _fake_checkpoint(path):
    """A checkpoint folder with the files a complete one has (`checkpoint_problem`)."""
    path.mkdir(parents=True)
    for name in ("trainer_state.json", "pruning_state.json"):
        (path / name).write_text("{}")
    (path / "model.safetensors").write_text("")


def _snapshot(root):
    return sorted((str(p.relative_to(root)), p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_dry_run_order_statuses_and_commands(tmp_path, tiny_model_dir, capsys):
    plan = _write_plan(tmp_path, tiny_model_dir, FULL_STEPS)
    results = tmp_path / "results"
    _metrics(results, "tiny_dense")  # metrics but no weights (a fresh clone): dense must train again
    _fake_checkpoint(results / "runs" / "tiny_pruned" / "checkpoints" / "checkpoint-2")  # interrupted mid-way
    grids = results / "oneshot" / "tiny_dense"
    grids.mkdir(parents=True)
    (grids / "wanda_b.json").write_text(json.dumps(
        {"dense": {}, setting_key("wanda", "0.5", False, 16): {"prune_time_s": 1.0}}))
    data = write_conll_dir(tmp_path / "conll", n_train=4, n_valid=2)  # no test.txt
    before = _snapshot(tmp_path)

    argv = ["reproduce", "--plan", str(plan), "--results-dir", str(results), "--data-dir", str(data), "--dry-run"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert _snapshot(tmp_path) == before  # a dry run writes nothing

    order = [line.split(".", 1)[1].split()[0] for line in out.splitlines() if line[:3].strip().rstrip(".").isdigit()]
    assert order == ["tiny_dense", "oneshot_wanda", "oneshot_table", "tiny_pruned", "tiny_pruned_80", "report"]
    steps = {s.name: s for s in build_steps(plan, results, str(data))}
    assert {n: (s.status, s.run) for n, s in steps.items()} == {
        "tiny_dense": ("re-run", True),
        "oneshot_wanda": ("resumable", True),
        "oneshot_table": ("to run", True),
        "tiny_pruned": ("resumable", True),
        "tiny_pruned_80": ("to run", True),
        "report": ("to run", True),
    }
    assert "weights" in steps["tiny_dense"].detail and "trains tiny_dense again" in steps["tiny_dense"].detail
    assert "1/3 settings" in steps["oneshot_wanda"].detail
    assert "checkpoint-2" in steps["tiny_pruned"].detail
    # Exact commands: the dependent model is rewritten to this results dir, variants get their name.
    # A variant of a recipe goes to ablations/, a recipe as shipped to runs/.
    cmd = steps["tiny_pruned_80"].display_command()
    assert (f"-m prune_trainer run {plan.parent / 'tiny_pruned.yaml'} --set pruning.schedule.final_sparsity=0.8 "
            f"--name tiny_pruned_80 --set init_from={results / 'runs' / 'tiny_dense' / 'model'} --data-dir {data} "
            f"--results-dir {results / 'ablations'}") in cmd
    assert f"--results-dir {results / 'runs'}" in steps["tiny_pruned"].display_command()
    grid = steps["oneshot_wanda"].display_command()
    assert (f"-m study oneshot-grid --model {results / 'runs' / 'tiny_dense' / 'model'} "
            f"--out {grids / 'wanda.json'} --methods wanda --sparsities 0.5,2:4 --owl both --calib 16 "
            f"--data-dir {data} --done {grids / 'wanda_b.json'}") in grid
    assert f"-m study oneshot-table --json {grids / 'wanda.json'} {grids / 'wanda_b.json'}" in (
        steps["oneshot_table"].display_command())
    assert "-m study report" in steps["report"].display_command()
    for line in (cmd, grid, "est. ", "ESTIMATES", "no test.txt: F1 on validation only"):
        assert line in out
    assert "to run: 6 of 6 steps" in out


def test_only_pulls_in_missing_dependency_and_bad_order_is_an_error(tmp_path, tiny_model_dir):
    plan = _write_plan(tmp_path, tiny_model_dir, FULL_STEPS)
    results = tmp_path / "results"
    _metrics(results, "tiny_dense")
    steps = {s.name: s for s in build_steps(plan, results, only=["tiny_pruned_8*"])}
    assert [n for n, s in steps.items() if s.run] == ["tiny_dense", "tiny_pruned_80"]
    assert not steps["report"].selected and not steps["tiny_pruned"].run
    _fake_model(results, "tiny_dense")  # weights present: dense stays done
    steps = {s.name: s for s in build_steps(plan, results, only=["tiny_pruned_80"])}
    assert [n for n, s in steps.items() if s.run] == ["tiny_pruned_80"]
    assert steps["tiny_dense"].status == "done"
    with pytest.raises(ValueError, match="matches no step"):
        build_steps(plan, results, only=["nothing*"])
    bad = _write_plan(tmp_path, tiny_model_dir, [{"recipe": "tiny_pruned.yaml"}, {"recipe": "tiny_dense.yaml"}])
    with pytest.raises(ValueError, match="which comes later"):
        build_steps(bad, results)


def test_a_truncated_metrics_file_is_run_again_not_taken_as_done(tmp_path, tiny_model_dir):
    plan = _write_plan(tmp_path, tiny_model_dir, FULL_STEPS)
    results = tmp_path / "results"
    _metrics(results, "tiny_dense")
    _fake_model(results, "tiny_dense")
    path = results / "runs" / "tiny_pruned" / "metrics.json"
    path.parent.mkdir(parents=True)
    path.write_text('{"name": "tiny_pruned", "eval_f1": 0.5')  # cut short while being written
    steps = {s.name: s for s in build_steps(plan, results)}
    assert steps["tiny_dense"].status == "done"
    assert steps["tiny_pruned"].status == "to run" and steps["tiny_pruned"].run


def test_finished_steps_are_skipped(tmp_path, tiny_model_dir):
    plan = _write_plan(tmp_path, tiny_model_dir, FULL_STEPS)
    results = tmp_path / "results"
    for name in ("tiny_dense", "tiny_pruned"):
        _metrics(results, name, config={"training": {"max_steps": 4}})
    _fake_model(results, "tiny_dense")
    (results / "oneshot" / "tiny_dense").mkdir(parents=True)
    (results / "oneshot" / "tiny_dense" / "wanda.json").write_text(json.dumps({
        setting_key("wanda", lvl, owl, 16): {} for lvl, owl in (("0.5", False), ("0.5", True), ("2:4", False))}))
    (results / "oneshot_table.md").write_text("table")
    ran = []
    executor = lambda step: ran.append(step.name) or 0  # noqa: E731
    assert reproduce(plan, results, executor=executor, log=lambda _: None) == 0
    assert ran == ["tiny_pruned_80", "report"]  # done steps skipped; the report follows what ran
    steps = {s.name: s for s in build_steps(plan, results)}
    assert steps["oneshot_wanda"].status == "done" and steps["oneshot_table"].status == "up to date"


def test_tiny_end_to_end_second_run_runs_nothing_and_resumes(tmp_path, tiny_model_dir, capsys):
    plan = _write_plan(tmp_path, tiny_model_dir)
    results = tmp_path / "results"
    data = write_conll_dir(tmp_path / "conll", n_train=32, n_valid=8, n_test=8)
    args = (plan, results, str(data))

    assert reproduce(*args, executor=in_process_executor) == 0
    dense = json.loads((results / "runs" / "tiny_dense" / "metrics.json").read_text())
    pruned = json.loads((results / "runs" / "tiny_pruned" / "metrics.json").read_text())
    assert pruned["config"]["init_from"] == str(results / "runs" / "tiny_dense" / "model")
    assert abs(pruned["sparsity"] - 0.5) < 1e-3 and dense["sparsity"] == 0.0
    assert "test_f1" in pruned  # every split the data has
    assert pruned["peak_rss_mib"] > 10 and pruned["pruning_steps"] >= 1 and pruned["pruning_time_s"] > 0
    assert dense["pruning_time_s"] == 0.0 and dense["resumed_from_step"] == 0

    ran = []
    executor = lambda step: ran.append(step.name) or 0  # noqa: E731
    capsys.readouterr()
    assert reproduce(*args, executor=executor) == 0
    assert ran == [] and "nothing to run" in capsys.readouterr().out

    # Interrupted after step 2: no metrics, last checkpoint-2. The next invocation resumes it (marker below
    # survives only through the checkpoint's trainer_state.json) and runs nothing else.
    ckpts = results / "runs" / "tiny_pruned" / "checkpoints"
    (results / "runs" / "tiny_pruned" / "metrics.json").unlink()
    for path in sorted((ckpts / "checkpoint-4").iterdir()):
        path.unlink()
    (ckpts / "checkpoint-4").rmdir()
    state_path = ckpts / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["log_history"].append({"marker": "from-checkpoint-2", "step": 2})
    state_path.write_text(json.dumps(state))
    saved_pruning = json.loads((ckpts / "checkpoint-2" / "pruning_state.json").read_text())
    statuses = {s.name: s.status for s in build_steps(*args)}
    assert statuses == {"tiny_dense": "done", "tiny_pruned": "resumable"}

    ran = []

    def recording(step):
        ran.append(step.name)
        return in_process_executor(step)

    assert reproduce(*args, executor=recording) == 0
    assert ran == ["tiny_pruned"]
    resumed = json.loads((results / "runs" / "tiny_pruned" / "metrics.json").read_text())
    assert {"marker": "from-checkpoint-2", "step": 2} in resumed["log_history"]
    assert resumed["resumed_from_step"] == 2 and resumed["train_steps"] == 4
    assert resumed["pruning_steps"] >= saved_pruning["pruning_steps"] >= 1  # carried over the resume
    assert abs(resumed["sparsity"] - 0.5) < 1e-3


def test_oneshot_grids_are_done_per_folder_and_samples_step(tmp_path, tiny_model_dir):
    """A setting key does not name the model: a grid in another folder (another dense model) does not count."""
    steps = [
        {"recipe": "tiny_dense.yaml"},
        {"name": "grid_a", "oneshot": {"method": "wanda", "model_from": "tiny_dense", "levels": [0.5],
                                       "calib": [8, 16], "out": "os_a/wanda.json"}},
        {"name": "grid_b", "oneshot": {"method": "wanda", "model_from": "tiny_dense", "levels": [0.5],
                                       "calib": [8, 16], "out": "os_b/wanda.json"}},
        {"name": "table_b", "oneshot_table": {"dir": "os_b", "md": "table_b.md", "calib": 16, "reference": True}},
        {"name": "samples_b", "oneshot_samples": {"dir": "os_b", "md": "samples_b.md", "png": "samples_b.png"}},
    ]
    plan = _write_plan(tmp_path, tiny_model_dir, steps)
    results = tmp_path / "results"
    _metrics(results, "tiny_dense")
    _fake_model(results, "tiny_dense")
    (results / "os_a").mkdir()
    (results / "os_a" / "wanda_x.json").write_text(json.dumps(
        {"dense": {}, **{setting_key("wanda", "0.5", False, n): {} for n in (8, 16)}}))
    by_name = {s.name: s for s in build_steps(plan, results)}
    assert by_name["grid_a"].status == "done" and not by_name["grid_a"].run
    assert by_name["grid_b"].status == "to run" and "0/2 settings" in by_name["grid_b"].detail
    assert "--calib 8,16" in by_name["grid_b"].display_command()
    assert "--done" not in by_name["grid_b"].display_command()  # os_a's files are another model's
    out_b = results / "os_b" / "wanda.json"
    assert f"oneshot-table --json {out_b} --md {results / 'table_b.md'} --calib 16 --reference" in (
        by_name["table_b"].display_command())
    assert f"oneshot-samples --json {out_b} --md {results / 'samples_b.md'} --png {results / 'samples_b.png'}" in (
        by_name["samples_b"].display_command())
    assert by_name["table_b"].run and by_name["samples_b"].run
    bad = _write_plan(tmp_path, tiny_model_dir, [{"recipe": "tiny_dense.yaml"}, {"name": "g", "oneshot": {
        "method": "wanda", "model_from": "tiny_dense", "levels": [0.5], "calib": [8, 0]}}])
    with pytest.raises(ValueError, match="calib must be a positive integer"):
        build_steps(bad, results)


def test_shipped_plan_parses_in_order():
    steps = build_steps(os.path.join(ROOT, "study", "plan.yaml"), os.path.join(ROOT, "nonexistent-results"))
    names = [s.name for s in steps]
    assert names[0] == "dense" and names[-1] == "report"
    assert names.index("oneshot_table") > max(names.index(f"oneshot_{m}") for m in ("magnitude", "wanda", "obs"))
    assert names.index("dense_emb64") < names.index("oneshot_obs") < names.index("oneshot_samples")
    assert names.index("oneshot_ref_table") > names.index("oneshot_ref_sparsegpt")
    by_name = {s.name: s for s in steps}
    assert by_name["oneshot_obs"].needs == ["dense_emb64"] and by_name["oneshot_ref_wanda"].needs == ["dense"]
    assert "--calib 64,256,1024,4096,8192" in by_name["oneshot_samples_sparsegpt"].display_command()
    for method in ("magnitude", "movement_hard", "movement_soft", "obert"):
        assert all(f"{method}_{s}" in names for s in (80, 90, 95, 97))
    assert all(s.run and s.status == "to run" for s in steps)
    magnitude_80 = next(s for s in steps if s.name == "magnitude_80")
    assert "--set pruning.schedule.final_sparsity=0.8 --name magnitude_80" in magnitude_80.display_command()
    dense = steps[0]
    assert dense.estimate_min == pytest.approx(3 * 8, rel=0.05)  # 3 epochs × ~8 min (estimate)
    one_epoch = build_steps(os.path.join(ROOT, "study", "plan.yaml"), "nonexistent-results", epochs=1)
    assert "--set training.num_train_epochs=1 " in one_epoch[0].display_command()
    assert one_epoch[0].estimate_min == pytest.approx(8, rel=0.05)


def test_shipped_plan_matches_the_committed_results():
    """Every training and one-shot step of study/plan.yaml finds its result in the committed results/ layout:
    shipped recipes in runs/, variants in ablations/, one-shot grids in oneshot/<model>/."""
    results = os.path.join(ROOT, "results")
    steps = build_steps(os.path.join(ROOT, "study", "plan.yaml"), results)
    undone = [s.name for s in steps if s.kind in ("recipe", "oneshot") and s.status != "done"]
    assert undone == []
    by_name = {s.name: s for s in steps}
    assert f"--results-dir {os.path.join(results, 'runs')}" in by_name["obert_90"].display_command()
    assert f"--results-dir {os.path.join(results, 'ablations')}" in by_name["magnitude_80"].display_command()
    assert by_name["oneshot_obs"].output == Path(results) / "oneshot" / "dense_emb64" / "obs.json"


def test_subprocess_steps_find_the_study_from_any_working_directory(tmp_path, monkeypatch):
    """Each step is its own `python -m study ...` process: it gets the repository root on PYTHONPATH."""
    from study.reproduce import Step, subprocess_executor

    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"dense": {"eval_f1": 0.9}, setting_key("wanda", "0.5", False, 16): {
        "eval_f1": 0.8, "prune_time_s": 1.0, "solve_time_s": 0.1}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    md = tmp_path / "table.md"
    step = Step("table", "oneshot_table", "study", ["oneshot-table", "--json", str(grid), "--md", str(md),
                                                    "--calib", "16"])
    assert subprocess_executor(step) == 0
    assert "| 50% | wanda | 0.800 |" in md.read_text()
