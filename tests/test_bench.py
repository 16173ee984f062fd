"""`prune-trainer bench`: side-by-side latency report of a structured export against its dense model."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_bert

from prune_trainer import StructuredPruningCallback, export_structured_model
from prune_trainer.bench import bench_models, format_report
from prune_trainer.cli import main


@pytest.fixture
def dense_and_pruned(tmp_path):
    dense = tiny_bert(seed=0)
    dense.save_pretrained(tmp_path / "dense")
    pruner = StructuredPruningCallback(dense, scope="layer", round_to_ffn=8)
    pruner.prune(0, target=0.5)
    export_structured_model(dense, tmp_path / "pruned")
    return tmp_path / "dense", tmp_path / "pruned"


def test_report_has_every_setting_and_consistent_ratios(dense_and_pruned):
    dense, pruned = dense_and_pruned
    report = bench_models(pruned, dense, batch_sizes=(1, 2), seq_len=8, threads=(1,), modes=("eager",),
                          rounds=1, reps=1, progress=False)
    settings = [(r["threads"], r["mode"], r["batch_size"]) for r in report["settings"]]
    assert settings == [(1, "eager", 1), (1, "eager", 2)]
    for row in report["settings"]:
        assert row["speedup"] == pytest.approx(row["baseline_ms"] / row["model_ms"], rel=1e-2)
    assert report["model_params"] < report["baseline_params"]
    assert 0 < report["model_mib"] < report["baseline_mib"]
    assert "speed-up" in format_report(report)


def test_cli_writes_json_and_refuses_bad_input(dense_and_pruned, tmp_path, capsys):
    dense, pruned = dense_and_pruned
    out = tmp_path / "bench.json"
    argv = ["bench", str(pruned), "--baseline", str(dense), "--batch-sizes", "1", "--seq-len", "8", "--threads", "1",
            "--rounds", "1", "--reps", "1", "--no-compile", "--json", str(out)]
    assert main(argv) == 0
    assert json.loads(out.read_text())["settings"][0]["batch_size"] == 1
    assert main(["bench", str(tmp_path / "missing")]) == 2
    assert "no config.json" in capsys.readouterr().err
    assert main(["bench", str(pruned), "--batch-sizes", "0", "--no-compile"]) == 2
    assert "batch size must be positive" in capsys.readouterr().err


def test_architecture_only_times_the_config_without_weight_files(dense_and_pruned, tmp_path):
    """A folder holding only the export's config.json builds the same sliced architecture (same parameter count
    and shapes as the loaded export, random values), so its latency can be measured without the weights."""
    import shutil

    from prune_trainer.bench import load_for_bench

    dense, pruned = dense_and_pruned
    config_only = tmp_path / "config_only"
    config_only.mkdir()
    shutil.copy(pruned / "config.json", config_only / "config.json")
    built, loaded = load_for_bench(config_only, weights=False), load_for_bench(pruned)
    assert {n: p.shape for n, p in built.named_parameters()} == {n: p.shape for n, p in loaded.named_parameters()}
    assert all(torch.isfinite(p).all() for p in built.parameters())
    with pytest.raises(FileNotFoundError):
        load_for_bench(config_only)  # weights asked for, none there
    report = bench_models(config_only, dense, batch_sizes=(1,), seq_len=8, threads=(1,), modes=("eager",),
                          rounds=1, reps=1, progress=False, weights=False)
    assert report["weights"].startswith("random init") and "model_mib" not in report
    assert report["model_params"] == sum(p.numel() for p in loaded.parameters())
    assert len(report["loadavg"]) == 3 and "baseline: " in format_report(report)
