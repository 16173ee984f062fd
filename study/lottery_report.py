"""The lottery ticket report of a results folder (``python -m study lottery-report results/lottery``).

Reads the lottery (``imp/summary.json``), its controls (``imp/control_<kind>/summary.json``), gradual magnitude
pruning runs (``gmp_<s>/metrics.json``), extra dense seeds (``dense_seed<n>/``) and extra seeds of a ticket
(``imp_round_<r>_seed<n>/``); writes ``results.json`` (every number with its source), ``README.md`` (the table)
and ``f1_vs_sparsity.png``. A subnetwork is *matching* when its F1 is at least the dense fine-tune's mean minus
one standard deviation over seeds (Chen et al. 2020); that is only stated with 3 or more dense seeds.
"""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

from prune_trainer.io import atomic_write_json, atomic_write_text
from study.report import save_f1_plot

CONTROLS = ("random-reinit", "random-mask")


def _metrics(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "metrics.json").read_text())


def _spread(values: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (n − 1) and count of ``values``."""
    std = statistics.stdev(values) if len(values) > 1 else None
    return {"mean": statistics.fmean(values), "std": std, "n": len(values), "values": values}


def collect(root: str | Path) -> dict[str, Any]:
    """Every measured number of the experiment in ``root``, by series."""
    root = Path(root)
    imp = json.loads((root / "imp" / "summary.json").read_text())
    out: dict[str, Any] = {"budget": imp["budget"], "rate": imp["rate"], "rewind": imp["rewind"],
                           "scope": imp["scope"], "imp": imp["rounds"], "controls": {}, "gmp": [], "seeds": {}}
    for kind in CONTROLS:
        path = root / "imp" / f"control_{kind}" / "summary.json"
        if path.is_file():
            out["controls"][kind] = json.loads(path.read_text())["rounds"]
    for folder in sorted(root.glob("gmp_*")):
        if (folder / "metrics.json").is_file():
            m = _metrics(folder)
            out["gmp"].append({"sparsity": m["sparsity"], "eval_f1": m["eval_f1"], "dir": str(folder),
                               "git_commit": m["git_commit"], "train_steps": m["train_steps"]})
    dense = [imp["rounds"][0]["eval_f1"]] + [_metrics(f)["eval_f1"] for f in sorted(root.glob("dense_seed*"))
                                             if (f / "metrics.json").is_file()]
    out["dense"] = _spread(dense)
    for folder in sorted(root.glob("imp_round_*_seed*")):
        r = int(re.match(r"imp_round_(\d+)_seed", folder.name).group(1))
        if (folder / "metrics.json").is_file() and r < len(imp["rounds"]):
            out["seeds"].setdefault(str(r), [imp["rounds"][r]["eval_f1"]]).append(_metrics(folder)["eval_f1"])
    out["seeds"] = {r: _spread(v) for r, v in out["seeds"].items()}
    return out


def matching(data: dict[str, Any], f1: float) -> bool | None:
    """Whether ``f1`` is within one standard deviation of the dense mean (None: fewer than 3 dense seeds)."""
    dense = data["dense"]
    if dense["n"] < 3:
        return None
    return f1 >= dense["mean"] - dense["std"]


def table(data: dict[str, Any]) -> list[str]:
    """Markdown rows: one per lottery round with the controls and GMP at the same sparsity."""
    fmt = lambda v: "–" if v is None else f"{v:.4f}"  # noqa: E731
    gmp = {round(g["sparsity"], 3): g["eval_f1"] for g in data["gmp"]}
    rows = ["| round | sparsity | ticket F1 | ticket F1, seeds (mean ± std) | random reinit | random mask | "
            "gradual magnitude | ticket matching? |", "|---|---|---|---|---|---|---|---|"]
    for row in data["imp"]:
        r = row["round"]
        ctrl = {k: next((c["eval_f1"] for c in data["controls"].get(k, []) if c["round"] == r), None)
                for k in CONTROLS}
        seeds = data["seeds"].get(str(r))
        seeded = f"{seeds['mean']:.4f} ± {seeds['std']:.4f} (n={seeds['n']})" if seeds else "–"
        f1 = seeds["mean"] if seeds and seeds["n"] >= 3 else row["eval_f1"]
        match = matching(data, f1) if r > 0 else None
        verdict = "–" if match is None else ("yes" if match else "no") + ("" if seeds else " (1 seed)")
        rows.append(f"| {r} | {row['sparsity']:.4f} | {row['eval_f1']:.4f} | {seeded} | {fmt(ctrl['random-reinit'])}"
                    f" | {fmt(ctrl['random-mask'])} | {fmt(gmp.get(round(row['sparsity'], 3)))} | {verdict} |")
    return rows


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    dense = data["dense"]
    if dense["std"] is not None:
        ax.axhspan(dense["mean"] - dense["std"], dense["mean"] + dense["std"], color="0.85",
                   label=f"dense, mean ± std ({dense['n']} seeds)")
    ax.axhline(dense["mean"], color="0.4", lw=1)
    series = [(f"IMP ticket (rewind: {data['rewind']})", data["imp"], "o-")]
    series += [(f"control: {k}", data["controls"][k], "s--") for k in CONTROLS if k in data["controls"]]
    series += [("gradual magnitude", sorted(data["gmp"], key=lambda g: g["sparsity"]), "^:")]
    for label, rows, style in series:
        if rows:
            ax.plot([100 * r["sparsity"] for r in rows], [r["eval_f1"] for r in rows], style, label=label)
    for r, s in data["seeds"].items():
        ax.errorbar(100 * data["imp"][int(r)]["sparsity"], s["mean"], yerr=s["std"], fmt="k_", capsize=4)
    save_f1_plot(fig, ax, "sparsity of the encoder Linears (%)", path, legend_size=8)


def write_lottery_report(root: str | Path) -> Path:
    """``results.json``, ``README.md`` and ``f1_vs_sparsity.png`` in ``root``; return the README's path."""
    root = Path(root)
    data = collect(root)
    atomic_write_json(root / "results.json", data)
    plot(data, root / "f1_vs_sparsity.png")
    budget = data["budget"]
    lines = [
        "# Lottery tickets: embedded MiniLM on CoNLL-2003", "",
        f"Rate {data['rate']} per round, rewind `{data['rewind']}`, {data['scope']} scope. Budget of every training:"
        f" {budget['train_steps_per_round']} steps (first {budget['max_train_samples']} training sentences, "
        f"{budget['training']['num_train_epochs']} epoch, batch {budget['training']['per_device_train_batch_size']}"
        f"); validation F1 on the recipe's evaluation sentences. Dense: {data['dense']['mean']:.4f}"
        + (f" ± {data['dense']['std']:.4f} ({data['dense']['n']} seeds)." if data["dense"]["std"] else "."),
        "", *table(data), "", "![F1 against sparsity](f1_vs_sparsity.png)", "",
    ]
    return atomic_write_text(root / "README.md", "\n".join(lines))
