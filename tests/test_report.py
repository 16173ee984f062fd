import json

from prune_trainer.cli import main
from prune_trainer.reporting import load_runs, results_table


def _write(root, name, f1, sparsity, method=None):
    run = root / name
    run.mkdir(parents=True)
    config = {"training": {"num_train_epochs": 3}, "pruning": {"method": method} if method else None}
    log = [{"step": s, "sparsity/global": sparsity * s / 100} for s in (0, 50, 100)] if method else []
    (run / "metrics.json").write_text(json.dumps({"name": name, "eval_f1": f1, "sparsity": sparsity,
                                                  "wall_time_s": 600.0, "config": config, "log_history": log}))


def test_report_table_and_plots(tmp_path, capsys):
    _write(tmp_path, "dense", 0.9, 0.0)
    _write(tmp_path, "magnitude_90", 0.81, 0.9, "magnitude")
    (tmp_path / "notes_only").mkdir()  # a folder without metrics is ignored
    runs = load_runs(tmp_path)
    assert [r["name"] for r in runs] == ["dense", "magnitude_90"]
    table = results_table(runs)
    assert "| [magnitude_90](magnitude_90/) | magnitude | 0.9000 | 0.8100 | 90.0% |" in table
    assert main(["report", str(tmp_path)]) == 0
    readme = (tmp_path / "README.md").read_text()
    assert "0.8100" in readme and "f1_vs_sparsity.png" in readme
    assert (tmp_path / "f1_vs_sparsity.png").stat().st_size > 1000
    assert (tmp_path / "sparsity_curves.png").stat().st_size > 1000
