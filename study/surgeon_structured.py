"""Structured one-shot pruning without training: F1 against measured CPU speedup for LLM Surgeon and its baselines.

``python -m study surgeon-structured --model results/dense/model --out results/oneshot/structured/surgeon.json
--methods llm-surgeon,k-obd,structured-obs,structured-magnitude --targets 0.2,0.35,0.5 --shots 4 --calib 128``:
each setting prunes heads and FFN neurons (``structures: [heads, ffn]``), exports the sliced model, and times it
against the dense model side by side (`bench_models`: eager, batch 1 and 32, seq 128); settings already in the
JSON are skipped (resumable, one atomic rewrite per finished setting). ``surgeon-structured-table`` writes the page.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from study.oneshot_grid import kept_notes, run_settings


def structured_key(method: str, target: float, allocation: str, shots: int, calib: int) -> str:
    return f"{method}|heads,ffn|{target}|{allocation}|T{shots}|n{calib}"


def _bench(model_dir: Path, dense: str, threads: int, seq_len: int) -> dict[str, Any]:
    from prune_trainer.bench import bench_models

    report = bench_models(model_dir, dense, batch_sizes=(1, 32), seq_len=seq_len, threads=(threads,), modes=("eager",),
                          rounds=3, reps=2, progress=False)
    by_batch = {row["batch_size"]: row for row in report["settings"]}
    return {"speedup_cpu_b1": by_batch[1]["speedup"], "speedup_cpu_b32": by_batch[32]["speedup"],
            "params": report["model_params"], "dense_params": report["baseline_params"],
            "model_mib": round(report["model_mib"], 2), "bench": report}


def run_structured(
    model: str, out_json: Path, methods: list[str], targets: list[float], allocation: str, shots: int, calib: int,
    data_dir: str | None = None, threads: int = 2, seq_len: int = 128, options: dict[str, Any] | None = None,
    tag: str = "",
) -> dict[str, Any]:
    """Run the missing (method, target) settings (`run_settings`); see module doc. ``options``: more
    `SurgeonOptions`; ``tag`` is appended to the method in the keys."""
    import torch

    from prune_trainer.data.conll import load_conll_splits
    from prune_trainer.oneshot.runner import OneShotConfig, run_oneshot

    torch.set_num_threads(1)
    splits = load_conll_splits(data_dir)

    def run(method: str, target: float) -> dict[str, Any]:
        with tempfile.TemporaryDirectory() as tmp:
            cfg = OneShotConfig(model=model, method=method, sparsity=target, structures=["heads", "ffn"],
                                calib_samples=calib, output_dir=tmp,
                                options={**(options or {}), "shots": shots, "allocation": allocation})
            res = run_oneshot(cfg, splits, progress=False)
            res.update(_bench(Path(tmp) / "model", model, threads, seq_len))
        res["config"]["output_dir"] = None
        res["bench_threads"] = threads
        return res

    settings = ((structured_key(method + tag, target, allocation, shots, calib), partial(run, method, target))
                for target in targets for method in methods)
    return run_settings(out_json, settings, describe=lambda key, res: (
        f"{key}: f1={res['eval_f1']:.4f} speedup b1={res['speedup_cpu_b1']} b32={res['speedup_cpu_b32']} "
        f"prune={res['prune_time_s']}s"))


def structured_markdown(results: dict[str, Any], dense_f1: float | None) -> str:
    """F1 and speedup per setting, sorted by target then method."""
    lines = ["# Structured one-shot pruning without training (heads + FFN neurons, CoNLL-2003 validation F1)", "",
             f"Dense F1: {dense_f1:.4f}." if dense_f1 else "", "",
             "| removed | method | allocation | shots | calib | F1 | % of dense | speedup b1 | speedup b32 | params "
             "| prune time (s) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    rows = sorted(((k.split("|"), r) for k, r in results.items() if "|" in k), key=lambda x: (x[0][2], x[0][0]))
    for (method, _, target, allocation, shots, calib), r in rows:
        rel = f"{r['eval_f1'] / dense_f1:.1%}" if dense_f1 else "–"
        lines.append(f"| {float(target):.0%} | {method} | {allocation} | {shots[1:]} | {calib[1:]} "
                     f"| {r['eval_f1']:.4f} | {rel} | {r['speedup_cpu_b1']:.2f}× | {r['speedup_cpu_b32']:.2f}× "
                     f"| {r['params'] / 1e6:.1f} M | {r['prune_time_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _grid_command(args: argparse.Namespace) -> int:
    run_structured(args.model, args.out, args.methods.split(","), [float(t) for t in args.targets.split(",")],
                   args.allocation, args.shots, args.calib, args.data_dir, args.threads, args.seq_len,
                   json.loads(args.options), args.tag)
    return 0


def _table_command(args: argparse.Namespace) -> int:
    results = json.loads(args.json.read_text())
    args.md.write_text(structured_markdown(results, args.dense_f1) + kept_notes(args.md))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """``surgeon-structured`` and ``surgeon-structured-table``."""
    g = sub.add_parser("surgeon-structured", help="structured one-shot grid with exports timed against the dense")
    g.add_argument("--model", required=True)
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--methods", default="llm-surgeon,k-obd,structured-obs,structured-magnitude")
    g.add_argument("--targets", default="0.2,0.35,0.5")
    g.add_argument("--allocation", choices=["global", "uniform"], default="uniform")
    g.add_argument("--shots", type=int, default=4)
    g.add_argument("--calib", type=int, default=128)
    g.add_argument("--threads", type=int, default=2, help="torch threads of the latency benchmark")
    g.add_argument("--seq-len", type=int, default=128, help="sequence length of the latency benchmark")
    g.add_argument("--options", default="{}", help="more SurgeonOptions as JSON, e.g. '{\"update\": false}'")
    g.add_argument("--tag", default="", help="appended to the method name in the keys")
    g.add_argument("--data-dir")
    g.set_defaults(func=_grid_command)
    t = sub.add_parser("surgeon-structured-table", help="markdown page of a surgeon-structured JSON")
    t.add_argument("--json", type=Path, required=True)
    t.add_argument("--md", type=Path, required=True)
    t.add_argument("--dense-f1", type=float, default=None)
    t.set_defaults(func=_table_command)
