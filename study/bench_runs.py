"""``python -m study bench-runs``: time the exports of finished runs against a baseline on this machine's CPU and
record the speed-up in each run's ``metrics.json`` (the keys the runner's ``bench`` recipe key writes).

For runs trained elsewhere (e.g. on a GPU) whose weight files did not come back: ``--architecture-only`` times the
architecture in ``<run>/model/config.json`` with random weights (`prune_trainer.bench.load_for_bench`), which is
what a dense kernel's latency depends on; the report records that (``bench.weights``) and the machine's load.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from prune_trainer.bench import bench_models, format_report, speedup_metrics
from prune_trainer.io import atomic_write_json


def bench_run(run_dir: Path, baseline: Path, architecture_only: bool, rounds: int, reps: int) -> dict:
    """Bench ``run_dir/model`` against ``baseline`` (eager, 2 threads, batch 1 and 32, seq 128); update and
    return the run's metrics."""
    metrics_file = run_dir / "metrics.json"
    if not metrics_file.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.json: not a finished run")
    metrics = json.loads(metrics_file.read_text())
    report = bench_models(run_dir / "model", baseline, batch_sizes=(1, 32), seq_len=128, threads=(2,),
                          modes=("eager",), rounds=rounds, reps=reps, weights=not architecture_only)
    print(format_report(report))
    metrics.update(speedup_metrics(report))
    atomic_write_json(metrics_file, metrics)
    return metrics


def _bench_runs(args: argparse.Namespace) -> int:
    for run in args.runs:
        m = bench_run(Path(run), Path(args.baseline), args.architecture_only, args.rounds, args.reps)
        print(f"{m['name']}: speedup_cpu_b1={m['speedup_cpu_b1']} speedup_cpu_b32={m['speedup_cpu_b32']}")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-runs", help="time finished runs' exports against a baseline; record the speed-ups")
    p.add_argument("runs", nargs="+", help="run folders (each with metrics.json and model/)")
    p.add_argument("--baseline", required=True, help="the dense model folder (or its config.json's folder)")
    p.add_argument("--architecture-only", action="store_true",
                   help="time the architectures of the configs with random weights (no weight files needed)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=3)
    p.set_defaults(func=_bench_runs)
