"""Build ``results/README.md`` (tables and plots) and ``results/index.{md,json}`` from the committed runs.

``python -m study report results/`` — every number is read from a ``metrics.json`` written by a recipe run
(``results/runs/*``, ``results/ablations/*``) or a one-shot grid JSON (``results/oneshot/<model>/*.json``);
nothing is typed in by hand.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from study.index import run_folders, write_index


def _runs_with(results_dir: str | Path, key: str) -> list[dict[str, Any]]:
    """Every ``<results_dir>/{runs,ablations}/<run>/metrics.json`` holding ``key``, each with ``folder``: its folder
    relative to ``results_dir`` (in memory only)."""
    runs = []
    for folder in run_folders(results_dir):
        data = json.loads((folder / "metrics.json").read_text())
        if key in data:
            data.setdefault("name", folder.name)
            data["folder"] = folder.relative_to(results_dir).as_posix()
            runs.append(data)
    return runs


def load_runs(results_dir: str | Path) -> list[dict[str, Any]]:
    """The token-classification runs (``metrics.json`` with ``eval_f1``; the others are skipped), see `_runs_with`."""
    return _runs_with(results_dir, "eval_f1")


def load_lm_runs(results_dir: str | Path) -> list[dict[str, Any]]:
    """The causal-LM recipe runs (``metrics.json`` with ``eval_perplexity``), see `_runs_with`."""
    return _runs_with(results_dir, "eval_perplexity")


def lm_table(runs: list[dict[str, Any]]) -> str:
    """Causal-LM runs: start model, pruning method, steps, sparsity measured on the export, perplexity (its windows)
    and wall time."""
    lines = ["| run | start model | method | steps | sparsity | perplexity | windows × tokens | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        config = r.get("config") or {}
        method = (config.get("pruning") or {}).get("method", "dense")
        start = Path(str(config.get("init_from") or config.get("model") or "-"))
        start = start.parent.name if start.name == "model" else start.name  # an export: its run's folder
        lines.append(f"| [{r['name']}]({r['folder']}/) | {start} | {method} | {r.get('train_steps', '-')} | "
                     f"{r['sparsity']:.4f} | {r['eval_perplexity']:.2f} | {r['eval_windows']} × "
                     f"{r.get('eval_seqlen', '-')} | {r['wall_time_s'] / 60:.1f} min |")
    return "\n".join(lines)


def _lm_section(results_dir: Path) -> list[str]:
    """The causal-LM runs (empty when there are none)."""
    runs = load_lm_runs(results_dir)
    if not runs:
        return []
    return ["## Causal-LM runs", "",
            "Recipes with `task: causal-lm`: perplexity of the trained export on the CoNLL-2003 validation text "
            "(non-overlapping windows, the one-shot protocol of `oneshot/smollm2`), sparsity measured on the export.",
            "", lm_table(runs), ""]


def _config_section(run: dict[str, Any], key: str) -> dict[str, Any]:
    """One section (``pruning``, ``training``, ...) of a run's stored config; ``{}`` when absent (dense runs)."""
    return (run.get("config") or {}).get(key) or {}


def _options(run: dict[str, Any]) -> dict[str, Any]:
    """The method's options of a run's stored config: ``pruning.options`` (``pruning.method_kwargs`` in runs
    recorded before that key was renamed)."""
    pruning = _config_section(run, "pruning")
    return pruning.get("options") or pruning.get("method_kwargs") or {}


def _method(run: dict[str, Any]) -> str:
    """The pruning method of a run; ``pruned-export`` for a fine-tune of a pruned export at its fixed structure."""
    pruning = _config_section(run, "pruning")
    if not pruning.get("method") and "start_params" in run:
        return "pruned-export"
    method = pruning.get("method", "dense")
    variant = _options(run).get("variant")
    return f"{method}-{variant}" if variant else method


def _method_variant(run: dict[str, Any]) -> str:
    """``_method`` plus the oBERT settings that tell its runs apart: gradient count m, learning rate, and the
    weight update when it is not the default joint solve (e.g. ``obert (m=512, lr=2e-04, summed)``)."""
    method = _method(run)
    if method != "obert":
        return method
    kwargs = _options(run)
    parts = [f"m={kwargs['num_grads']}"] if kwargs.get("num_grads") is not None else []
    learning_rate = _config_section(run, "training").get("learning_rate")
    if learning_rate is not None:
        parts.append(f"lr={float(learning_rate):.0e}")
    if kwargs.get("update", "joint") != "joint":
        parts.append(str(kwargs["update"]))
    return f"{method} ({', '.join(parts)})" if parts else method


def _epochs(run: dict[str, Any]) -> str:
    training = _config_section(run, "training")
    if training.get("max_steps", -1) not in (-1, None):
        return f"{training['max_steps']} steps"
    return str(training.get("num_train_epochs", "?"))


def sparsity_curve(run: dict[str, Any]) -> tuple[list[int], list[float]]:
    """(steps, global sparsity) from ``sparsity_curve`` if the run has one, else its Trainer log history."""
    if run.get("sparsity_curve"):
        curve = run["sparsity_curve"]
        return [int(s) for s in curve["step"]], [float(v) for v in curve["global"]]
    steps, values = [], []
    for row in run.get("log_history", []):
        if "sparsity/global" in row and "step" in row:
            steps.append(int(row["step"]))
            values.append(float(row["sparsity/global"]))
    return steps, values


def results_table(runs: list[dict[str, Any]], superseded: dict[str, str] | None = None) -> str:
    """Markdown table: run, method, sparsity reached, F1 (and % of dense), epochs, wall time, device;
    ``superseded`` (run → the run that replaced it, from the index) marks a run as such."""
    dense = next((r for r in runs if r["name"] == "dense"), None)
    lines = [
        "| run | method | encoder sparsity | eval F1 | % of dense | test F1 | epochs | wall time | device |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for run in sorted(runs, key=lambda r: (_method(r) != "dense", _method(r), r.get("sparsity", 0.0))):
        rel = f"{100 * run['eval_f1'] / dense['eval_f1']:.1f}%" if dense else "-"
        test = f"{run['test_f1']:.4f}" if "test_f1" in run else "-"
        wall = f"{run['wall_time_s'] / 60:.1f} min" if "wall_time_s" in run else "-"
        later = (superseded or {}).get(run["name"])
        note = f" (superseded by [{later}](runs/{later}/))" if later else ""
        lines.append(
            f"| [{run['name']}]({run['folder']}/){note} | {_method(run)} | {run.get('sparsity', 0.0):.4f} | "
            f"{run['eval_f1']:.4f} | {rel} | {test} | {_epochs(run)} | {wall} | {run.get('device', '-')} |"
        )
    return "\n".join(lines)


def _level(run: dict[str, Any]) -> str:
    """Column of the method × sparsity table: the N:M pattern, else the reached sparsity in percent."""
    pruning = _config_section(run, "pruning")
    pattern = pruning.get("pattern") or (pruning.get("schedule") or {}).get("pattern")  # (older runs: schedule)
    if pattern and pattern != "unstructured":
        return str(pattern)
    return f"{round(100 * float(run.get('sparsity', 0.0)))}%"


def _row_label(run: dict[str, Any]) -> str:
    """Row of the method × sparsity table: the method, with the N:M score (and a dynamic mask) spelled out."""
    pruning = _config_section(run, "pruning")
    kwargs = _options(run)
    label = _method_variant(run)
    if pruning.get("method") == "nm":
        label = f"nm ({kwargs.get('score', 'magnitude')}{', ' + kwargs['dynamic'] if kwargs.get('dynamic') else ''})"
    elif label == "dense":  # another dense model (e.g. dense_emb64): its own row, not the reference's
        label = f"dense ({run['name']})"
    return label


def _level_key(level: str) -> tuple[int, float]:
    return (1, 0.0) if ":" in level else (0, float(level.rstrip("%")))


def method_sparsity_table(runs: list[dict[str, Any]], oneshot: dict[str, dict[str, Any]] | None = None,
                          calib: int = 1024, reference: dict[tuple[str, str, str], float] | None = None,
                          reference_label: str = "ref") -> str:
    """Markdown pivot: one row per method, one column per sparsity level (or N:M pattern); a cell is
    ``F1 (% of dense, epochs)`` of the run at that level (several runs: one per line), one-shot rows
    (the grid JSONs at ``calib`` sentences, uniform and OWL) without training. ``reference``
    maps ``(method, level, "uniform"|"owl")`` (the setting key's spelling, e.g. ``("obs", "0.8", "owl")``) to
    a published F1, shown beside that one-shot cell as ``(<reference_label> 0.804)``."""
    dense = next((r for r in runs if r["name"] == "dense"), None)
    cells: dict[str, dict[str, list[str]]] = {}
    for run in runs:
        if run["name"] == "dense":
            continue
        rel = f"{100 * run['eval_f1'] / dense['eval_f1']:.1f}%, " if dense else ""
        cells.setdefault(_row_label(run), {}).setdefault(_level(run), []).append(
            f"{run['eval_f1']:.4f} ({rel}{_epochs(run)} ep)")
    for key, res in sorted((oneshot or {}).items()):
        parts = key.split("|")
        if len(parts) < 4 or parts[3] != f"n{calib}" or "eval_f1" not in res:
            continue
        method, level, dist = parts[0], parts[1], parts[2]
        ref = (reference or {}).get((method, level, dist))
        cell = f"{res['eval_f1']:.4f}" + (f" ({reference_label} {ref:.3f})" if ref is not None else "")
        level = level if ":" in level else f"{round(100 * float(level))}%"
        label = f"one-shot {method}" + (" + OWL" if dist == "owl" else "")
        cells.setdefault(label, {}).setdefault(level, []).append(cell)
    levels = sorted({lv for row in cells.values() for lv in row}, key=_level_key)
    lines = [
        "| method | " + " | ".join(levels) + " |",
        "|---|" + "---|" * len(levels),
    ]
    for label in sorted(cells, key=lambda x: (x.startswith("one-shot"), x)):
        row = cells[label]
        lines.append(f"| {label} | " + " | ".join("<br>".join(row.get(lv, ["–"])) for lv in levels) + " |")
    return "\n".join(lines)


def _train_runtime(run: dict[str, Any]) -> float | None:
    """Seconds the Trainer spent in ``train()`` (its ``train_runtime`` log entry), None if not logged."""
    for row in reversed(run.get("log_history") or []):
        if "train_runtime" in row:
            return float(row["train_runtime"])
    return None


def _fmt(value: Any, fmt: str, unit: str = "", scale: float = 1.0) -> str:
    """``value / scale`` formatted with ``fmt`` and ``unit`` appended, or ``-`` when the run did not record it."""
    return "-" if value is None else f"{format(float(value) / scale, fmt)}{unit}"


def cost_table(runs: list[dict[str, Any]]) -> str:
    """Markdown table of each training run's costs; ``-`` where an (older) run did not record a value.

    Columns: wall time of the whole run (load, train, evaluate, export); seconds per optimizer step
    (``train_runtime`` / steps trained in that ``train()`` call, i.e. without a resumed run's earlier part);
    time inside the pruning callback's mask updates (``pruning_time_s``, all parts of a resumed run) and
    its share of ``train_runtime``; peak resident memory of the process (``peak_rss_mib``).
    """
    lines = [
        "| run | method | steps | wall time | s / step | pruning steps time | pruning share | peak memory |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in sorted(runs, key=lambda r: (_method(r) != "dense", _method(r), r.get("sparsity", 0.0))):
        runtime = _train_runtime(run)
        steps = run.get("train_steps")
        trained = None if steps is None else steps - int(run.get("resumed_from_step") or 0)
        per_step = runtime / trained if runtime is not None and trained else None
        pruning = run.get("pruning_time_s")
        share = f"{100 * pruning / runtime:.1f}%" if pruning is not None and runtime else "-"
        lines.append(
            f"| [{run['name']}]({run['folder']}/) | {_method(run)} | {_fmt(steps, '.0f')} | "
            f"{_fmt(run.get('wall_time_s'), '.1f', ' min', 60)} | {_fmt(per_step, '.2f')} | "
            f"{_fmt(pruning, '.1f', ' s')} | {share} | {_fmt(run.get('peak_rss_mib'), '.0f', ' MiB')} |"
        )
    return "\n".join(lines)


ONESHOT_DIR = "oneshot"
"""``<results>/oneshot/<model>/<method>.json``: one folder per dense model (a setting key does not name it)."""
ONESHOT_PIVOT_DIR = "oneshot/dense"
"""Folder of the one-shot grid on the same dense model the training runs start from (rows of the pivot table)."""
ONESHOT_TABLE1_DIR = "oneshot/dense_emb64"
"""Folder of the one-shot grid in the deep-dive's Table 1 setting (factorized embeddings, 4096 sentences)."""


def authors_reference() -> dict[tuple[str, str, str], float]:
    """The authors' own SparseGPT / Wanda code on the dense model (1024 sentences, uniform): reference F1s."""
    from study.oneshot_grid import AUTHORS_REFERENCE

    return {(m, lv, "uniform"): f1 for m, levels in AUTHORS_REFERENCE.items() for lv, f1 in levels.items()}


def paper_reference() -> dict[tuple[str, str, str], float]:
    """Table 1 of the unstructured-pruning deep-dive (bert-base-cased, factorized embeddings, 4096 samples)."""
    from study.oneshot_grid import PAPER_TABLE

    out: dict[tuple[str, str, str], float] = {}
    for level, methods in PAPER_TABLE.items():
        for method, (uniform, owl, _time) in methods.items():
            out[(method, str(level), "uniform")], out[(method, str(level), "owl")] = uniform, owl
    return out


def oneshot_folders(results_dir: str | Path) -> list[Path]:
    """The folders ``<results_dir>/oneshot/<model>/`` that hold one-shot grid files (one folder per dense model)."""
    return sorted(p for p in (Path(results_dir) / ONESHOT_DIR).glob("*") if p.is_dir() and any(p.glob("*.json")))


def load_oneshot_results(folder: str | Path) -> dict[str, dict[str, Any]]:
    """Union of the one-shot grid files ``<folder>/*.json`` (setting key → result)."""
    from study.oneshot_grid import merge_results

    merged = merge_results(sorted(Path(folder).glob("*.json")))
    return {k: v for k, v in merged.items() if k != "dense" and isinstance(v, dict)}


def oneshot_cost_table(results: dict[str, dict[str, Any]]) -> str:
    """Markdown table of one-shot pruning times per method and calibration size (median, min–max over settings).

    ``prune`` = calibration forward passes + pruning (``prune_time_s``); ``solve`` = the per-layer pruning math
    only (``solve_time_s``); evaluation is not included.
    """
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for key, res in results.items():
        parts = key.split("|")
        calib = [int(p[1:]) for p in parts[1:] if p[:1] == "n" and p[1:].isdigit()]  # the n<calibration> part
        if not calib or "prune_time_s" not in res:
            continue
        groups.setdefault((parts[0], calib[0]), []).append(res)
    lines = [
        "| method | calibration sentences | settings | prune time median (min–max) | solve time median |",
        "|---|---|---|---|---|",
    ]
    for (method, calib), items in sorted(groups.items()):
        prune = sorted(float(r["prune_time_s"]) for r in items)
        solve = sorted(float(r["solve_time_s"]) for r in items if r.get("solve_time_s") is not None)
        lines.append(
            f"| {method} | {calib} | {len(items)} | {_median(prune):.1f} s ({prune[0]:.1f}–{prune[-1]:.1f}) | "
            f"{f'{_median(solve):.1f} s' if solve else '-'} |"
        )
    return "\n".join(lines)


def _median(values: list[float]) -> float:
    n = len(values)
    return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2


def plot_runs(runs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """``f1_vs_sparsity.png`` and ``sparsity_curves.png`` in ``out_dir``; returns the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    by_series: dict[str, list[tuple[float, float]]] = {}  # one line per method and training budget
    for run in runs:
        method, budget = _method_variant(run), _epochs(run)
        budget = budget if budget.endswith("steps") else f"{budget} ep"
        label = run["name"] if method == "dense" else f"{method}, {budget}"  # a dense model is one point
        by_series.setdefault(label, []).append((run.get("sparsity", 0.0), run["eval_f1"]))
    colors = plt.get_cmap("tab20").colors  # 20 distinct colours (the default cycle repeats after 10)
    for i, (label, points) in enumerate(sorted(by_series.items())):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label, color=colors[i % 20])
    written.append(save_f1_plot(fig, ax, "encoder Linear sparsity", out_dir / "f1_vs_sparsity.png"))

    curves = [(r["name"], *sparsity_curve(r)) for r in runs]
    curves = [c for c in curves if c[1]]
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (name, steps, values) in enumerate(curves):
            style = ("-", "--", ":")[(i // len(colors)) % 3]  # a new line style per colour cycle
            ax.plot(steps, values, label=name, color=colors[i % len(colors)], linestyle=style)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("global sparsity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out_dir / "sparsity_curves.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def _group_score(run: dict[str, Any]) -> str:
    """``taylor`` / ``fisher`` / ``magnitude`` for ``method: structured``, ``movement (hard)`` for group movement,
    ``one-shot (fixed)`` for a fine-tune of a pruned export."""
    pruning = _config_section(run, "pruning")
    if _method(run) == "pruned-export":
        return "one-shot (fixed)"
    options = pruning.get("options") or {}
    if pruning.get("method") == "structured_movement":
        return f"movement ({options.get('variant', 'hard')})"
    return str(options.get("score", "magnitude"))


def save_f1_plot(fig: Any, ax: Any, xlabel: str, path: Path, legend_size: int = 7) -> Path:
    """Label (``xlabel`` against validation entity F1), grid, legend, save at 120 dpi and close a figure."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation entity F1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def structured_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs that removed heads / FFN neurons and were timed against their dense model (``speedup_cpu_b32``)."""
    return [r for r in runs if r.get("structure") and "speedup_cpu_b32" in r]


def structured_table(runs: list[dict[str, Any]]) -> str:
    """Structured runs: group score, removed fraction, epochs, F1 and the CPU speed-ups (eager, 2 threads)."""
    lines = ["| run | score | removed | epochs | F1 | speed-up b1 | speed-up b32 | params | trained on |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(structured_runs(runs), key=lambda r: (_group_score(r), r["sparsity"], r["name"])):
        removed = f"{r['sparsity']:.0%}" if _method(r) != "pruned-export" else "(one-shot)"
        lines.append(f"| {r['name']} | {_group_score(r)} | {removed} | {_epochs(r)} | {r['eval_f1']:.4f} "
                     f"| {r['speedup_cpu_b1']:.2f}× | {r['speedup_cpu_b32']:.2f}× | {r['params'] / 1e6:.1f}M "
                     f"| {r.get('device', '?')} |")
    return "\n".join(lines)


def plot_structured(runs: list[dict[str, Any]], out_dir: Path) -> list[Path]:
    """``structured_f1_vs_speedup.png``: F1 against the measured CPU speed-up at batch 32, one line per group score
    and training budget; nothing when no structured run was timed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, list[tuple[float, float]]] = {}
    for run in structured_runs(runs):
        label = f"{_group_score(run)}, {_epochs(run)} ep"
        series.setdefault(label, []).append((run["speedup_cpu_b32"], run["eval_f1"]))
    if not series:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in sorted(series.items()):
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    return [save_f1_plot(fig, ax, "CPU speed-up at batch 32 (eager, 2 threads, seq 128)",
                          out_dir / "structured_f1_vs_speedup.png")]


def _header(runs: list[dict[str, Any]], superseded: dict[str, str]) -> list[str]:
    return [
        "# Results",
        "",
        "Generated by `python -m study report results/` from the `metrics.json` of each run (each run's folder has "
        "its command, git commit, device and full config). Every run with its recipe, overrides and budget: "
        "[index.md](index.md); canonical runs of the shipped recipes are in `runs/`, variants in `ablations/`.",
        "Model: the embedded all-MiniLM-L6-v2 BERT; data: CoNLL-2003 "
        + ("(validation and test splits)." if any("test_f1" in r for r in runs)
           else "(validation split; the data directory had no test.txt)."),
        "Sparsity: fraction of zeros over the pruned encoder Linear weights, measured on the exported model.",
        "",
        results_table(runs, superseded),
        "",
    ]


def _pivot_section(runs: list[dict[str, Any]], results_dir: Path) -> list[str]:
    """Methods × sparsity: training runs and the one-shot grid on the dense model they start from."""
    pivot_dir = results_dir / ONESHOT_PIVOT_DIR
    return [
        "## Methods × sparsity",
        "",
        "Validation F1 of each training-time run (% of the dense F1, epochs) at the sparsity it reached, and the "
        "one-shot settings (no training; 1024 calibration sentences; uniform or OWL layer-wise sparsity) from "
        f"`{ONESHOT_PIVOT_DIR}/*.json` (one-shot pruning of the dense model the training runs start from); beside a "
        "one-shot F1, in parentheses, the F1 at the same setting measured with the authors' own SparseGPT / Wanda "
        "code (`authors`). `–`: not run.",
        "",
        method_sparsity_table(runs, load_oneshot_results(pivot_dir), reference=authors_reference(),
                              reference_label="authors"),
        "",
    ]


def _table1_section(runs: list[dict[str, Any]], results_dir: Path) -> list[str]:
    """The one-shot grid in the deep-dive's Table 1 setting, beside the paper's numbers (empty if not run)."""
    from study.oneshot_grid import PAPER_DENSE_F1

    table1_dir = results_dir / ONESHOT_TABLE1_DIR
    if not any(table1_dir.glob("*.json")):
        return []
    emb64 = next((r for r in runs if r["name"] == "dense_emb64"), None)
    dense_note = f"the dense model `dense_emb64` has F1 {emb64['eval_f1']:.4f}; " if emb64 else ""
    return [
        f"One-shot pruning in the setting of Table 1 of the unstructured-pruning deep-dive (`{ONESHOT_TABLE1_DIR}/"
        "*.json`: rank-64 factorized word embeddings, 4096 calibration sentences, every encoder Linear); beside "
        f"each F1, in parentheses, the paper's number for bert-base-cased (`paper`; {dense_note}the paper's dense "
        f"{PAPER_DENSE_F1}). Times and analysis: [{ONESHOT_TABLE1_DIR}/README.md]({ONESHOT_TABLE1_DIR}/README.md).",
        "",
        method_sparsity_table([], load_oneshot_results(table1_dir), calib=4096, reference=paper_reference(),
                              reference_label="paper"),
        "",
    ]


def _costs_section(runs: list[dict[str, Any]], results_dir: Path) -> list[str]:
    """Training costs and, per one-shot folder, one-shot pruning times."""
    text = [
        "## Costs",
        "",
        "Training runs: wall time of the whole run (load, train, evaluate, export); seconds per optimizer step "
        "(`train_runtime` / steps trained); time spent inside the pruning callback's mask updates "
        "(`pruning_time_s`, also as a share of `train_runtime`); peak resident memory of the run's process "
        "(`peak_rss_mib`). `-`: the run predates these measurements. Times depend on how busy the machine was "
        "(see the notes below).",
        "",
        cost_table(runs),
        "",
    ]
    for folder in oneshot_folders(results_dir):
        text += [
            f"One-shot pruning (`{folder.relative_to(results_dir).as_posix()}/*.json`): prune = calibration forward "
            "passes + pruning, solve = the per-layer pruning math only; evaluation not included.",
            "",
            oneshot_cost_table(load_oneshot_results(folder)),
            "",
        ]
    return text


def _pages_section(results_dir: Path) -> list[str]:
    """Links to the other result pages (one-shot tables and analyses), then the hand-written notes."""
    pages = sorted(p for p in (results_dir / ONESHOT_DIR).glob("*/*.md"))
    text = ["Other result tables:", ""] + [f"- [{p.relative_to(results_dir).as_posix()}]"
                                           f"({p.relative_to(results_dir).as_posix()})" for p in pages] + [""]
    notes = results_dir / "NOTES.md"
    return (text if pages else []) + ([notes.read_text()] if notes.is_file() else [])


def write_report(results_dir: str | Path = "results") -> Path:
    """Write ``<results_dir>/README.md`` (+ plots) and ``index.md`` / ``index.json`` from the runs found there;
    return the README's path."""
    results_dir = Path(results_dir)
    runs = load_runs(results_dir)
    if not runs:
        raise FileNotFoundError(f"no {{runs,ablations}}/*/metrics.json with eval_f1 under {results_dir}")
    index_json = write_index(results_dir)[0]
    superseded = {e["run"]: e["superseded_by"] for e in json.loads(index_json.read_text()) if e["superseded_by"]}
    plots = plot_runs(runs, results_dir)
    text = [*_header(runs, superseded), *_pivot_section(runs, results_dir), *_table1_section(runs, results_dir)]
    for plot in plots:
        text += [f"![{plot.stem}]({plot.name})", ""]
    if structured_runs(runs):
        text += ["## Structured pruning: F1 against the measured CPU speed-up", "", structured_table(runs), ""]
        text += [f"![{p.stem}]({p.name})" for p in plot_structured(runs, results_dir)] + [""]
    text += [*_lm_section(results_dir), *_costs_section(runs, results_dir), *_pages_section(results_dir)]
    path = results_dir / "README.md"
    path.write_text("\n".join(text))
    return path
