"""Command line: ``python -m prune_trainer run recipes/<name>.yaml [--set key=value ...]``."""

from __future__ import annotations

import argparse
import sys


def _run(args: argparse.Namespace) -> int:
    from prune_trainer.recipes.runner import load_recipe, run_recipe

    overrides = list(args.set or [])
    if args.data_dir:
        overrides.append(f"data.data_dir={args.data_dir}")
    if args.model:
        overrides.append(f"model={args.model}")
    if args.max_steps is not None:
        overrides.append(f"training.max_steps={args.max_steps}")
    if args.name:
        overrides.append(f"name={args.name}")
    if args.output_dir:
        overrides.append(f"output_dir={args.output_dir}")
    recipe = load_recipe(args.recipe, overrides)
    metrics = run_recipe(recipe, results_root=args.results_dir)
    line = f"{metrics['name']}: eval_f1={metrics['eval_f1']:.4f}"
    if "test_f1" in metrics:
        line += f" test_f1={metrics['test_f1']:.4f}"
    line += f" sparsity={metrics['sparsity']:.4f} wall_time_s={metrics['wall_time_s']:.0f}"
    print(line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prune-trainer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a YAML recipe (fine-tune + prune + export + results)")
    run.add_argument("recipe", help="path to a recipe YAML, e.g. recipes/magnitude_90.yaml")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    run.add_argument("--data-dir", help="CoNLL-2003 directory (default: $PRUNE_TRAINER_CONLL_DIR, else the hub)")
    run.add_argument("--model", help="HF model id or path (default: the embedded all-MiniLM-L6-v2)")
    run.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    run.add_argument("--name", help="run name (default: the recipe's)")
    run.add_argument("--output-dir", help="where results go (default: <results-dir>/<name>)")
    run.add_argument("--results-dir", default="results", help="root of results (default: results)")
    run.set_defaults(func=_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, ImportError) as err:
        print(f"prune-trainer: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
