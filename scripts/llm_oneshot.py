"""One-shot pruning grid of a causal LM (default: the embedded SmolLM2-135M) judged by perplexity: magnitude, Wanda,
SparseGPT and OWL (Wanda with OWL's block sparsities) at unstructured sparsities and N:M, plus the dense row; also
LLM Surgeon (``--methods llm-surgeon --options '{"shots": 2}'``: its options as JSON).

    PRUNE_TRAINER_CONLL_DIR=/work/shared/data/conll2003 nohup nice -n 10 python scripts/llm_oneshot.py \
        --out results/oneshot/smollm2 --settings 0.5,2:4,0.6,0.7 --methods sparsegpt,wanda,magnitude,owl &

A thin driver over the library's one-shot job: every row is `run_oneshot` with ``task="causal-lm"`` (the
family-generic sequential runner `prune_sequential`, no export) and the dense row its evaluator alone; the same
row is ``prune-trainer oneshot --task causal-lm --seqlen ... --no-export``. Each finished row is appended to
``<out>/results.json`` (atomically); rows already there are skipped, so a restart resumes. Calibration: ``--calib``
random windows of ``--seqlen`` tokens of ``--calib-source`` (default the CoNLL-2003 training text; SparseGPT's
sampling). Perplexity: non-overlapping ``--seqlen`` windows of ``--eval-source`` (default the CoNLL-2003
validation text): all of them, or ``--eval-windows`` evenly spaced ones. OWL: ``D_l`` per decoder block, M = 5,
λ = 0.08 (Yin et al. 2024, the LLaMA settings).
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import torch

from prune_trainer.data.conll import Sentence, load_conll_splits
from prune_trainer.io import atomic_write_json
from prune_trainer.llm.models import EMBEDDED_LLM
from prune_trainer.masking.selection import parse_pattern
from prune_trainer.oneshot.runner import OneShotConfig, run_oneshot
from prune_trainer.provenance import git_commit

OWL_M, OWL_LAMBDA = 5.0, 0.08  # Yin et al. 2024, §4 (LLaMA settings)
DEFAULT_CALIB, DEFAULT_EVAL = "conll-train", "conll-validation"


def row_key(method: str, setting: str, calib: int, eval_windows: int | None, options: dict | None = None) -> str:
    """A row's key in ``results.json``: ``method|setting|allocation|n<calib>|w<eval windows>`` as the study's
    one-shot grids (``dense|w<eval windows>`` for the dense row, which needs no calibration), then
    ``|key=value,...`` when the pruner got ``options``."""
    if method == "dense":
        return f"dense|w{eval_windows}"
    options = options or {}
    allocation = "owl" if method == "owl" else options.get("allocation", "uniform")
    key = f"{method}|{setting}|{allocation}|n{calib}|w{eval_windows}"
    return key + ("|" + ",".join(f"{k}={v}" for k, v in sorted(options.items())) if options else "")


def parse_setting(setting: str) -> tuple[float, str, int, int]:
    """``"0.5"`` → unstructured 50%; ``"2:4"`` → N:M (sparsity 1 − N/M)."""
    nm = parse_pattern(setting) if ":" in setting else None
    if nm:
        return 1.0 - nm[0] / nm[1], setting, nm[0], nm[1]
    return float(setting), "unstructured", 0, 0


def row_config(method: str, setting: str, args: argparse.Namespace) -> OneShotConfig:
    """The library one-shot configuration of one grid row (``owl``: Wanda with OWL's block sparsities; ``dense``:
    the evaluation settings only)."""
    dense = method == "dense"
    method, setting = ("magnitude", "0.5") if dense else (method, setting)
    sparsity, pattern, _, _ = parse_setting(setting)
    owl = method == "owl"
    if owl and pattern != "unstructured":
        raise ValueError("OWL allocates unstructured sparsity; it does not combine with N:M")
    return OneShotConfig(
        model=args.model, task="causal-lm", method="wanda" if owl else method, sparsity=sparsity, pattern=pattern,
        owl=owl, owl_m=OWL_M, owl_lambda=OWL_LAMBDA if owl else None, owl_scope="block", calib_samples=args.calib,
        calib_batch_size=args.batch_size, seed=args.seed, max_length=args.seqlen, eval_batch_size=args.eval_batch_size,
        eval_windows=args.eval_windows, calib_text=None if args.calib_source == DEFAULT_CALIB else args.calib_source,
        eval_file=None if args.eval_source == DEFAULT_EVAL else args.eval_source, data_dir=args.data_dir,
        device=args.device, export=False, options={} if dense else dict(args.options),
    )


def run_row(method: str, setting: str, args: argparse.Namespace, splits: dict[str, list[Sentence]]) -> dict[str, Any]:
    """One grid row: prune (unless ``dense``) and score with the library's one-shot job."""
    cfg = row_config(method, setting, args)
    res = dense_results(cfg, splits) if method == "dense" else run_oneshot(cfg, splits, progress=False)
    sparsity, pattern, _, _ = parse_setting(setting)
    row: dict[str, Any] = {"model": args.model, "method": method, "setting": setting, "sparsity": sparsity,
                           "pattern": pattern, "prune_time_s": res["prune_time_s"], "solve_time_s": res["solve_time_s"]}
    if method == "dense":
        row.update(sparsity=0.0, pattern="dense")
    if args.options:
        row["options"] = dict(args.options)
    if res.get("owl"):
        row["owl"] = {"m": OWL_M, "lambda": OWL_LAMBDA, "outlier_ratio": per_block(res["owl"]["outlier_ratios"]),
                      "block_sparsity": per_block(res["owl"]["layer_sparsity"])}
    row.update(measured_sparsity=round(res["sparsity"], 6), perplexity=round(res["eval_perplexity"], 4),
               nll=round(res["eval_nll"], 6), eval_tokens=res["eval_tokens"], eval_windows=res["eval_windows"],
               eval_time_s=res["eval_time_s"], calib_tokens=res["calib_tokens"])
    return {**row, **provenance(args, res["device"])}


def dense_results(cfg: OneShotConfig, splits: dict[str, list[Sentence]]) -> dict[str, Any]:
    """The dense model scored by the one-shot job's causal-LM evaluator (no calibration, no pruning)."""
    from prune_trainer.devices import device_description, resolve_device
    from prune_trainer.masking.inject import DEFAULT_EXCLUDE, find_target_linears
    from prune_trainer.masking.sparsity import weight_sparsity_report
    from prune_trainer.models import resolve_model_path
    from prune_trainer.oneshot.evaluation import evaluate_task
    from prune_trainer.tasks import load_model_for_task

    device = resolve_device(cfg.device)
    model, tokenizer, task = load_model_for_task(resolve_model_path(cfg.model), cfg.task)
    model.to(device).eval()
    names = find_target_linears(model, cfg.targets, DEFAULT_EXCLUDE)
    return {"prune_time_s": 0.0, "solve_time_s": 0.0, "calib_tokens": 0, "device": device_description(device),
            "sparsity": float(weight_sparsity_report(model, names)["global_sparsity"]),
            **evaluate_task(task, model, tokenizer, splits, cfg)}


def per_block(values: dict[str, float]) -> dict[int, float]:
    """A per-Linear dict (equal within a block, OWL's block scope) as block index → value."""
    out: dict[int, float] = {}
    for name, value in values.items():
        out.setdefault(int(re.search(r"\.(\d+)\.", name).group(1)), value)
    return out


def provenance(args: argparse.Namespace, device: str) -> dict[str, Any]:
    return {
        "calib_samples": args.calib, "max_eval_windows": args.eval_windows, "seqlen": args.seqlen,
        "calib_source": args.calib_source, "eval_source": args.eval_source, "seed": args.seed,
        "git_commit": git_commit(), "device": device,
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
    }


def load_rows(path: Path) -> dict[str, dict[str, Any]]:
    """The finished rows by key (`row_key`); a list of rows (the first format) is keyed on load."""
    data = json.loads(path.read_text()) if path.is_file() else {}
    if isinstance(data, list):
        data = {row_key(r["method"], r["setting"], r["calib_samples"], r.get("max_eval_windows", r["eval_windows"])): r
                for r in data}
    return data


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """The rows as a Markdown table, with each perplexity's ratio to the dense row's."""
    dense = next((r["perplexity"] for r in rows if r["method"] == "dense"), None)
    lines = ["| method | pattern | target sparsity | measured sparsity | calibration windows | perplexity | × dense | "
             "prune time (s) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['perplexity'] / dense:.2f}" if dense else "–"
        method = r["method"] + "".join(f" {k}={v}" for k, v in sorted(r.get("options", {}).items()))
        calib = "–" if r["method"] in ("dense", "magnitude") else r["calib_samples"]
        lines.append(f"| {method} | {r['pattern']} | {r['sparsity']:.0%} | {r['measured_sparsity']:.1%} | "
                     f"{calib} | {r['perplexity']:.2f} | {ratio} | {r['prune_time_s']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out_path = Path(args.out) / "results.json"
    if args.table:
        print(markdown_table(list(load_rows(out_path).values())))
        return
    torch.manual_seed(0)
    rows = load_rows(out_path)
    plan = [("dense", "0")] + [(m, s) for s in args.settings.split(",") for m in args.methods.split(",")
                                if not (m == "owl" and ":" in s)]
    for method, setting in plan:  # every configuration is checked before anything runs
        if method != "dense":
            row_config(method, setting, args).validate()
    splits = load_conll_splits(args.data_dir)
    for method, setting in plan:
        key = row_key(method, setting, args.calib, args.eval_windows, args.options)
        if key in rows:
            print(f"skip {method} {setting}: already in {out_path}", flush=True)
            continue
        rows[key] = run_row(method, setting, args, splits)
        atomic_write_json(out_path, rows)
        print(json.dumps({k: rows[key][k] for k in ("method", "setting", "perplexity", "prune_time_s")}), flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=EMBEDDED_LLM)
    p.add_argument("--out", required=True)
    p.add_argument("--methods", default="sparsegpt,wanda,magnitude,owl")
    p.add_argument("--settings", default="0.5,2:4,0.6,0.7")
    p.add_argument("--calib", type=int, default=32, help="calibration windows")
    p.add_argument("--seqlen", type=int, default=512, help="calibration and perplexity window (tokens)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per forward")
    p.add_argument("--eval-windows", type=int, default=None, help="perplexity windows, evenly spaced (default: all)")
    p.add_argument("--eval-batch-size", type=int, default=1)
    p.add_argument("--calib-source", default=DEFAULT_CALIB, help="conll-train | wikitext2-train | a text file")
    p.add_argument("--eval-source", default=DEFAULT_EVAL, help="conll-validation | wikitext2-test | a text file")
    p.add_argument("--data-dir", help="CoNLL-2003 directory (default: $PRUNE_TRAINER_CONLL_DIR, else the hub)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--options", type=json.loads, default={},
                   help='the pruner\'s options as JSON, e.g. \'{"shots": 2, "cg_iters": 20}\' for llm-surgeon')
    p.add_argument("--table", action="store_true", help="print <out>/results.json as a Markdown table and exit")
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
