"""``python -m study``: ``reproduce`` (the whole study, ``study/plan.yaml``), ``report`` (``results/README.md``
and ``results/index.{md,json}``), the one-shot grid commands (``oneshot-grid``, ``oneshot-table``,
``oneshot-samples``), ``bench-runs`` (speed-ups of finished runs' exports) and ``lottery-report``."""

from __future__ import annotations

import argparse
import sys

from study.bench_runs import add_parser as add_bench_runs_parser
from study.oneshot_grid import add_parsers as add_oneshot_parsers
from study.reproduce import DEFAULT_PLAN
from study.surgeon_structured import add_parsers as add_surgeon_parsers


def _reproduce(args: argparse.Namespace) -> int:
    from study.reproduce import in_process_executor, reproduce, subprocess_executor

    return reproduce(
        args.plan, args.results_dir, args.data_dir, dry_run=args.dry_run, only=args.only, epochs=args.epochs,
        executor=in_process_executor if args.in_process else subprocess_executor,
    )


def _report(args: argparse.Namespace) -> int:
    from study.report import write_report

    print(f"wrote {write_report(args.results_dir)}")
    return 0


def _lottery_report(args: argparse.Namespace) -> int:
    from study.lottery_report import write_lottery_report

    print(f"wrote {write_lottery_report(args.results_dir)}")
    return 0


def _add_reproduce_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reproduce",
        help="run the whole study (plan: study/plan.yaml), skipping finished steps, resuming interrupted ones",
    )
    p.add_argument("--plan", default=DEFAULT_PLAN, help="plan YAML (default: study/plan.yaml)")
    p.add_argument("--results-dir", default="results", help="root of results (default: results)")
    p.add_argument("--data-dir", help="CoNLL-2003 directory (default: $PRUNE_TRAINER_CONLL_DIR, else the hub)")
    p.add_argument("--dry-run", action="store_true", help="print the ordered plan, statuses and commands; run nothing")
    p.add_argument("--only", action="append", metavar="PATTERN",
                   help="only steps whose name matches this glob (comma-separated or repeated), plus what they need")
    p.add_argument("--epochs", type=float, help="override num_train_epochs of every training step")
    p.add_argument("--in-process", action="store_true",
                   help="run the steps in this process instead of one child process each (debugging)")
    p.set_defaults(func=_reproduce)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m study", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_reproduce_parser(sub)
    report = sub.add_parser("report", help="write <results>/README.md, index.md, index.json and plots")
    report.add_argument("results_dir", nargs="?", default="results")
    report.set_defaults(func=_report)
    lottery = sub.add_parser("lottery-report", help="write the lottery ticket table, JSON and plot of a folder")
    lottery.add_argument("results_dir", nargs="?", default="results/lottery")
    lottery.set_defaults(func=_lottery_report)
    add_oneshot_parsers(sub)
    add_bench_runs_parser(sub)
    add_surgeon_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, ImportError, ConnectionError) as err:
        print(f"study: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
