"""Grids of one-shot runs into one JSON per (dense model, method), and the markdown table / sample-size page.

``python -m study oneshot-grid --model results/runs/dense/model --out results/oneshot/dense/sparsegpt.json
--methods sparsegpt --sparsities 0.5,0.7,2:4 --owl no --calib 1024``: runs every missing setting (resumable:
settings already in the JSON, or in the JSONs given with ``--done``, are skipped) with one torch thread.
``python -m study oneshot-table --json ... --md results/oneshot/dense/README.md`` and
``python -m study oneshot-samples --json ... --md ... --png ...``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

from prune_trainer.io import atomic_write_json

# Table 1 of the unstructured-pruning deep-dive (bert-base-cased on CoNLL-2003, rank-64 factorized embeddings,
# 4096 calibration samples):
# sparsity → method → (F1 uniform, F1 OWL, time s).
PAPER_TABLE: dict[float, dict[str, tuple[float, float, float]]] = {
    0.5: {"obs": (0.870, 0.868, 192.5), "sparsegpt": (0.869, 0.871, 18.0), "wanda": (0.862, 0.863, 0.9)},
    0.6: {"obs": (0.862, 0.863, 231.0), "sparsegpt": (0.866, 0.866, 18.0), "wanda": (0.827, 0.826, 0.9)},
    0.7: {"obs": (0.851, 0.857, 267.9), "sparsegpt": (0.851, 0.856, 18.0), "wanda": (0.526, 0.563, 0.9)},
    0.8: {"obs": (0.804, 0.816, 300.7), "sparsegpt": (0.770, 0.791, 18.0), "wanda": (0.033, 0.042, 0.9)},
}
PAPER_DENSE_F1 = 0.872
# Reference points: the authors' own SparseGPT / Wanda code on this setup (the dense model without factorization,
# 1024 calibration sentences, uniform sparsity).
AUTHORS_REFERENCE: dict[str, dict[str, float]] = {
    "sparsegpt": {"0.5": 0.896, "0.7": 0.782, "0.8": 0.470, "2:4": 0.875},
    "wanda": {"0.5": 0.871, "0.7": 0.437, "0.8": 0.222, "2:4": 0.755},
    "magnitude": {"0.5": 0.847, "0.7": 0.364, "0.8": 0.102, "2:4": 0.646},
}


def setting_key(method: str, level: str, owl: bool | str, calib: int, seed: int = 0) -> str:
    """``level`` is a sparsity like ``"0.7"`` or an N:M pattern like ``"2:4"``; ``owl``: True/False (OWL or uniform
    layer sparsity) or an LLM Surgeon allocation (``"global"`` / ``"uniform"``)."""
    mode = owl if isinstance(owl, str) else ("owl" if owl else "uniform")
    return f"{method}|{level}|{mode}|n{calib}|s{seed}"


def _modes(method: str, owl_modes: list[bool], allocations: list[str]) -> list[bool | str]:
    """The allocation modes of a method: OWL on/off for the layer-wise methods, LLM Surgeon's allocations."""
    from prune_trainer.oneshot.surgeon import SURGEON_METHODS

    return list(allocations) if method in SURGEON_METHODS else list(owl_modes)


def run_settings(
    out_json: Path, settings: Iterable[tuple[str, Callable[[], dict[str, Any]]]], done_keys: Iterable[str] = (),
    describe: Callable[[str, dict[str, Any]], str] | None = None,
) -> dict[str, Any]:
    """Run each ``(key, run)`` whose key is in neither ``out_json`` nor ``done_keys``; stamp the result with
    ``finished_at`` and the checked-out ``git_commit`` and rewrite ``out_json`` atomically after each, so an
    interrupted grid resumes. ``settings`` may be a generator: a run is only built when its key is missing."""
    from prune_trainer.provenance import git_commit

    commit = git_commit()  # the code that runs is the code checked out now
    done = set(done_keys)
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    for key, run in settings:
        if key in results or key in done:
            continue
        res = run()
        res.update(finished_at=time.strftime("%Y-%m-%d %H:%M:%S"), git_commit=commit)
        results[key] = res
        atomic_write_json(out_json, results)
        print(describe(key, res) if describe else f"{key}: f1={res['eval_f1']:.4f}", flush=True)
    return results


def _grid_settings(
    model: str, methods: list[str], levels: list[str], owl_modes: list[bool], calibs: list[int], splits: dict,
    owl_m: float, seed: int, options: dict[str, Any] | None, allocations: tuple[str, ...], tag: str,
) -> Iterator[tuple[str, Callable[[], dict[str, Any]]]]:
    from prune_trainer.oneshot.runner import OneShotConfig, run_oneshot

    def run(cfg: OneShotConfig) -> dict[str, Any]:
        res = run_oneshot(cfg, splits, progress=False)
        res.pop("sparsity_per_layer", None)
        return res

    for calib in calibs:
        for level in levels:
            for method in methods:
                for owl in _modes(method, owl_modes, allocations):
                    if owl is True and ":" in level:
                        continue
                    pattern = level if ":" in level else "unstructured"
                    sparsity = 0.0 if ":" in level else float(level)
                    opts = {**(options or {}), **({"allocation": owl} if isinstance(owl, str) else {})}
                    cfg = OneShotConfig(model=model, method=method, sparsity=sparsity, pattern=pattern,
                                        owl=owl is True, owl_m=owl_m, calib_samples=calib, seed=seed, export=False,
                                        options=opts)
                    yield setting_key(method + tag, level, owl, calib, seed), partial(run, cfg)


def run_grid(
    model: str,
    out_json: Path,
    methods: list[str],
    levels: list[str],
    owl_modes: list[bool],
    calibs: list[int],
    data_dir: str | None = None,
    owl_m: float = 1.0,
    seed: int = 0,
    done_keys: Iterable[str] = (),
    options: dict[str, Any] | None = None,
    allocations: tuple[str, ...] = ("uniform",),
    tag: str = "",
) -> dict[str, Any]:
    """Run every (calib, level, method, OWL / allocation) setting not yet in ``out_json`` nor in ``done_keys``
    (`run_settings`: one atomic rewrite per finished setting), with one torch thread.

    ``options``: the methods' options (e.g. LLM Surgeon's ``shots``); LLM Surgeon methods run each of
    ``allocations`` instead of the OWL modes; ``tag`` is appended to the method in the setting keys.
    """
    import torch

    from prune_trainer.data.conll import load_conll_splits

    torch.set_num_threads(1)
    splits = load_conll_splits(data_dir)
    results = json.loads(out_json.read_text()) if out_json.is_file() else {}
    if "dense" not in results:
        results["dense"] = {**_dense_f1(model, splits), "trained": model_description(model)}
        atomic_write_json(out_json, results)
    settings = _grid_settings(model, methods, levels, owl_modes, calibs, splits, owl_m, seed, options, allocations,
                              tag)
    return run_settings(out_json, settings, done_keys, lambda key, res: (
        f"{key}: f1={res['eval_f1']:.4f} sparsity={res['sparsity']:.4f} "
        f"prune={res['prune_time_s']:.1f}s solve={res['solve_time_s']:.1f}s"))


def _dense_f1(model: str, splits: dict) -> dict[str, Any]:
    from prune_trainer.models import load_model_and_tokenizer
    from prune_trainer.oneshot.evaluation import evaluate_f1

    m, tok = load_model_and_tokenizer(model)
    scores = evaluate_f1(m, tok, splits["validation"])
    return {"model": model, **{f"eval_{k}": v for k, v in scores.items()}, "eval_sentences": len(splits["validation"])}


def _get(results: dict, method: str, level: str, owl: bool, calib: int) -> dict | None:
    return results.get(setting_key(method, level, owl, calib))


def _f(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def model_description(model: str) -> str:
    """How the grid's dense model was trained, from the ``metrics.json`` the recipe runner wrote beside it."""
    metrics = Path(model).parent / "metrics.json"
    try:
        data = json.loads(metrics.read_text())
    except (OSError, json.JSONDecodeError):
        return "embedding factorization unknown (no metrics.json beside the model)"
    rank = (data.get("config") or {}).get("factorize_embeddings")
    what = f"word embeddings factorized to rank {rank}" if rank else "**no embedding factorization**"
    return f"recipe `{data.get('name', '?')}`, {what}, git `{str(data.get('git_commit', '?'))[:8]}`"


def table_markdown(results: dict[str, Any], calib: int, reference: bool = False) -> str:
    """Table 1 layout: per sparsity and method, F1 uniform / OWL and pruning time, next to the paper.

    ``reference``: add the check against the authors' code (``AUTHORS_REFERENCE``, settings with 1024 sentences)."""
    dense = results.get("dense", {})
    model = str(dense.get("model", "?"))
    threads = sorted({r.get("torch_threads") for k, r in results.items() if k != "dense" and r.get("torch_threads")})
    lines = [
        f"# One-shot pruning on CoNLL-2003 (validation F1, {dense.get('eval_sentences', '?')} sentences)",
        "",
        f"Model: `{model}` (fine-tuned dense embedded all-MiniLM-L6-v2; "
        f"{dense.get('trained') or model_description(model) + ' (read when the table was made)'}), "
        f"dense F1 {_f(dense.get('eval_f1'))}. Calibration: {calib} train sentences, "
        "every encoder Linear, layer-sequential with pruned inputs; OWL with M=1 (no λ bound). "
        f"Time = wall time of calibration forward passes + pruning with {'/'.join(map(str, threads)) or '?'} "
        "torch thread(s) per setting (solve = the per-layer pruning math only); the machine and its load are "
        "in the notes below and `finished_at` in the JSONs.",
        "",
        "| Sparsity | Method | F1 uniform | F1 OWL | % of dense (uniform) | time uniform / OWL (s) | solve (s) "
        "| paper F1 uniform | paper F1 OWL | paper % of dense (uniform) | paper time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
        f"| 0% | dense | {_f(dense.get('eval_f1'))} | {_f(dense.get('eval_f1'))} | 100% | – | – | {PAPER_DENSE_F1} "
        f"| {PAPER_DENSE_F1} | 100% | – |",
    ]
    dense_f1 = dense.get("eval_f1")
    for level in ("0.5", "0.6", "0.7", "0.8", "2:4"):
        for method in ("obs", "sparsegpt", "wanda", "magnitude"):
            uni, owl = _get(results, method, level, False, calib), _get(results, method, level, True, calib)
            if uni is None and owl is None:
                continue
            paper = PAPER_TABLE.get(float(level), {}).get(method) if ":" not in level else None
            t = uni or owl
            label = f"{float(level):.0%}" if ":" not in level else level
            rel = f"{uni['eval_f1'] / dense_f1:.1%}" if uni and dense_f1 else "–"
            paper_rel = f"{paper[0] / PAPER_DENSE_F1:.1%}" if paper else "–"
            times = f"{_f(uni and uni['prune_time_s'], 1)} / {_f(owl and owl['prune_time_s'], 1)}"
            lines.append(
                f"| {label} | {method} | {_f(uni and uni['eval_f1'])} | {_f(owl and owl['eval_f1'])} | {rel} "
                f"| {times} | {_f(t['solve_time_s'], 1)} | {_f(paper and paper[0])} "
                f"| {_f(paper and paper[1])} | {paper_rel} | {_f(paper and paper[2], 1)} |"
            )
    if not reference:
        return "\n".join(lines) + "\n"
    lines += ["", "## Check against the authors' SparseGPT / Wanda code (1024 sentences)", "",
              "| Method | level | ours F1 | reference F1 | difference |", "|---|---|---|---|---|"]
    for method, refs in AUTHORS_REFERENCE.items():
        for level, ref in refs.items():
            ours = _get(results, method, level, False, 1024)
            diff = None if ours is None else ours["eval_f1"] - ref
            lines.append(f"| {method} | {level} | {_f(ours and ours['eval_f1'])} | {ref:.3f} | {_f(diff)} |")
    return "\n".join(lines) + "\n"


def surgeon_markdown(results: dict[str, Any], calibs: Iterable[int], base_calib: int) -> str:
    """LLM Surgeon rows (uniform and global allocation, at each of ``calibs`` sentences) beside OBS and SparseGPT
    (uniform, at ``calibs`` when measured, and at ``base_calib``): F1 and whole-pipeline / solve times."""
    calibs = set(calibs)
    dense = results.get("dense", {})
    dense_f1 = dense.get("eval_f1")
    lines = [
        "# LLM Surgeon beside OBS and SparseGPT (CoNLL-2003 validation F1)", "",
        f"Model: `{dense.get('model', '?')}`, dense F1 {_f(dense_f1, 4)}. Time = calibration + pruning wall time "
        "(s), one torch thread; solve = the pruning math only (LLM Surgeon: costs, thresholds and updates, without "
        "the curvature passes).", "",
        "| level | method | allocation | calib | shots | F1 | % of dense | time (s) | solve (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for key, r in results.items():
        if key == "dense":
            continue
        method, level, mode, n, _ = key.split("|")
        if ("surgeon" in method and int(n[1:]) in calibs) or (
                method in ("obs", "sparsegpt") and mode == "uniform" and int(n[1:]) in calibs | {base_calib}):
            rows.append((level, method, mode, int(n[1:]), r))
    for level, method, mode, n, r in sorted(rows, key=lambda x: (x[0], "surgeon" not in x[1], x[1], x[2], x[3])):
        label = f"{float(level):.0%}" if ":" not in level else level
        shots = ((r["config"].get("options") or {}).get("shots", 1)) if "surgeon" in method else "–"
        rel = f"{r['eval_f1'] / dense_f1:.1%}" if dense_f1 else "–"
        lines.append(f"| {label} | {method} | {mode} | {n} | {shots} | {r['eval_f1']:.4f} | {rel} "
                     f"| {r['prune_time_s']:.1f} | {r['solve_time_s']:.1f} |")
    return "\n".join(lines) + "\n"


def samples_markdown(results: dict[str, Any], png: Path | None) -> str:
    """F1 against the number of calibration sentences for each (method, sparsity) measured."""
    series: dict[tuple[str, str], dict[int, float]] = {}
    for key, res in results.items():
        if key == "dense":
            continue
        method, level, mode, n, _ = key.split("|")
        if mode == "uniform" and ":" not in level:
            series.setdefault((method, level), {})[int(n[1:])] = res["eval_f1"]
    series = {k: v for k, v in series.items() if len(v) > 1}
    ns = sorted({n for v in series.values() for n in v})
    lines = ["# Validation F1 vs number of calibration sentences (uniform sparsity)", "",
             "| Method | Sparsity | " + " | ".join(str(n) for n in ns) + " |", "|---|---|" + "---|" * len(ns)]
    for (method, level), v in sorted(series.items()):
        lines.append(f"| {method} | {float(level):.0%} | " + " | ".join(_f(v.get(n)) for n in ns) + " |")
    if png is not None and series:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for (method, level), v in sorted(series.items()):
            xs = sorted(v)
            ax.plot(xs, [v[x] for x in xs], marker="o", label=f"{method} {float(level):.0%}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("calibration sentences")
        ax.set_ylabel("validation F1")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(png, dpi=120)
        lines += ["", f"![F1 vs calibration samples]({png.name})"]
    return "\n".join(lines) + "\n"


NOTES_HEADING = "## Notes"


def kept_notes(md: Path) -> str:
    """The hand-written ``## Notes`` section of an existing table / figure page, kept when it is regenerated."""
    if not md.is_file():
        return ""
    text = md.read_text()
    at = text.find("\n" + NOTES_HEADING + "\n")
    return "" if at < 0 else "\n" + text[at + 1 :]


def merge_results(paths: list[Path]) -> dict[str, Any]:
    """Union of several grid JSONs (later files win on equal keys)."""
    merged: dict[str, Any] = {}
    for path in paths:
        merged.update(json.loads(Path(path).read_text()))
    return merged


def grid_command(args: argparse.Namespace) -> int:
    """``oneshot-grid``: run the missing settings of one grid."""
    owl_modes = {"no": [False], "yes": [True], "both": [False, True]}[args.owl]
    run_grid(args.model, args.out, args.methods.split(","), args.sparsities.split(","), owl_modes,
             [int(c) for c in args.calib.split(",")], args.data_dir,
             done_keys=[k for p in args.done if p.is_file() for k in json.loads(p.read_text())],
             options=json.loads(args.options), allocations=tuple(args.allocations.split(",")), tag=args.tag)
    return 0


def table_command(args: argparse.Namespace) -> int:
    """``oneshot-table``: the Table 1 page from the merged grid JSONs, keeping its hand-written notes."""
    text = table_markdown(merge_results(args.json), args.calib, args.reference)
    args.md.write_text(text + kept_notes(args.md))
    return 0


def surgeon_command(args: argparse.Namespace) -> int:
    """``oneshot-surgeon-table``: LLM Surgeon beside OBS / SparseGPT from merged grid JSONs, keeping notes."""
    text = surgeon_markdown(merge_results(args.json), [int(c) for c in args.calib.split(",")], args.base_calib)
    args.md.write_text(text + kept_notes(args.md))
    return 0


def samples_command(args: argparse.Namespace) -> int:
    """``oneshot-samples``: the F1-vs-calibration-sentences page (and figure), keeping its notes."""
    text = samples_markdown(merge_results(args.json), args.png)
    args.md.write_text(text + kept_notes(args.md))
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """The ``oneshot-grid``, ``oneshot-table`` and ``oneshot-samples`` subcommands of ``python -m study``."""
    g = sub.add_parser("oneshot-grid", help="run the missing settings of a one-shot grid into one JSON")
    g.add_argument("--model", required=True)
    g.add_argument("--out", type=Path, required=True)
    g.add_argument("--methods", default="sparsegpt,wanda,magnitude")
    g.add_argument("--sparsities", default="0.5,0.7,0.8,2:4")
    g.add_argument("--owl", choices=["no", "yes", "both"], default="no")
    g.add_argument("--calib", default="1024")
    g.add_argument("--data-dir")
    g.add_argument("--done", type=Path, nargs="*", default=[],
                   help="other grid JSONs whose settings count as done (not rerun)")
    g.add_argument("--options", default="{}", help="the methods' options as JSON, e.g. '{\"shots\": 2}'")
    g.add_argument("--allocations", default="uniform", help="LLM Surgeon methods: uniform,global")
    g.add_argument("--tag", default="", help="appended to the method name in the setting keys")
    g.set_defaults(func=grid_command)
    t = sub.add_parser("oneshot-table", help="markdown table (Table 1 layout) from grid JSONs")
    t.add_argument("--json", type=Path, nargs="+", required=True, help="one or more grid JSONs (merged)")
    t.add_argument("--md", type=Path, required=True)
    t.add_argument("--calib", type=int, default=1024)
    t.add_argument("--reference", action="store_true",
                   help="add the check against the authors' SparseGPT / Wanda code (1024-sentence settings)")
    t.set_defaults(func=table_command)
    u = sub.add_parser("oneshot-surgeon-table", help="LLM Surgeon rows beside OBS and SparseGPT from grid JSONs")
    u.add_argument("--json", type=Path, nargs="+", required=True, help="one or more grid JSONs (merged)")
    u.add_argument("--md", type=Path, required=True)
    u.add_argument("--calib", required=True, help="calibration sentences of the LLM Surgeon rows (comma-separated)")
    u.add_argument("--base-calib", type=int, default=4096, help="calibration sentences of the OBS/SparseGPT rows")
    u.set_defaults(func=surgeon_command)
    s = sub.add_parser("oneshot-samples", help="F1 vs calibration sentences (markdown + figure) from grid JSONs")
    s.add_argument("--json", type=Path, nargs="+", required=True, help="one or more grid JSONs (merged)")
    s.add_argument("--md", type=Path, required=True)
    s.add_argument("--png", type=Path)
    s.set_defaults(func=samples_command)
