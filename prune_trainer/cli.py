"""Command line: ``python -m prune_trainer run recipes/<name>.yaml [--set key=value ...]``, ``oneshot``,
``bench``, ``export`` (compressed checkpoints), ``onnx`` and ``lottery``."""

from __future__ import annotations

import argparse
import sys


def _run(args: argparse.Namespace) -> int:
    from prune_trainer.recipes.runner import load_recipe, run_recipe

    recipe = load_recipe(
        args.recipe, args.set, model=args.model, name=args.name, output_dir=args.output_dir, data_dir=args.data_dir,
        max_steps=args.max_steps,
    )
    metrics = run_recipe(recipe, results_root=args.results_dir, overwrite=args.overwrite)
    line = f"{metrics['name']}:"
    for key in ("eval_f1", "test_f1", "eval_perplexity"):  # token classification: F1; causal LM: perplexity
        if key in metrics:
            line += f" {key}={metrics[key]:.4f}"
    line += f" sparsity={metrics['sparsity']:.4f} wall_time_s={metrics['wall_time_s']:.0f}"
    print(line)
    return 0


def _add_recipe_run_arguments(p: argparse.ArgumentParser, default_model: str, max_steps_help: str) -> None:
    """The options every recipe-running command shares: overrides, data, model, budget, name and output folders."""
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key (repeatable)")
    p.add_argument("--data-dir", help="CoNLL-2003 directory (default: $PRUNE_TRAINER_CONLL_DIR, else the hub)")
    p.add_argument("--model", help=f"HF model id or path (default: {default_model})")
    p.add_argument("--max-steps", type=int, help=max_steps_help)
    p.add_argument("--name", help="run name (default: the recipe's)")
    p.add_argument("--output-dir", help="where results go (default: <results-dir>/<name>)")
    p.add_argument("--results-dir", default="results", help="root of results (default: results)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="prune-trainer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a YAML recipe (fine-tune + prune + export + results)")
    run.add_argument("recipe", help="path to a recipe YAML, e.g. recipes/magnitude_90.yaml")
    _add_recipe_run_arguments(run, "the embedded all-MiniLM-L6-v2", "stop after this many optimizer steps")
    run.add_argument("--overwrite", action="store_true",
                     help="delete an existing output folder and start over (default: resume it, same recipe only)")
    run.set_defaults(func=_run)
    _add_oneshot_parser(sub)
    _add_bench_parser(sub)
    _add_export_parsers(sub)
    _add_lottery_parser(sub)
    return parser


def _lottery(args: argparse.Namespace) -> int:
    from prune_trainer.recipes.lottery import LotteryConfig, run_lottery
    from prune_trainer.recipes.runner import load_recipe

    config = LotteryConfig(rounds=args.rounds, rate=args.rate, rewind=args.rewind, scope=args.scope,
                           control=args.control, seed=args.seed)  # checked before the recipe is read
    recipe = load_recipe(
        args.recipe, args.set, model=args.model, name=args.name, output_dir=args.output_dir, data_dir=args.data_dir,
        max_steps=args.max_steps,
    )
    summary = run_lottery(recipe, config, results_root=args.results_dir)
    for row in summary["rounds"]:
        print(f"{summary['name']} {summary['control']} round {row['round']}: eval_f1={row['eval_f1']:.4f} "
              f"sparsity={row['sparsity']:.4f}")
    return 0


def _add_lottery_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lottery", help="lottery tickets: iterative magnitude pruning with rewinding (and controls)")
    p.add_argument("recipe", help="recipe YAML of one round's training (its pruning block is ignored but targets)")
    p.add_argument("--rounds", type=int, default=3, help="pruning rounds after the dense round 0 (default 3)")
    p.add_argument("--rate", type=float, default=0.2, help="fraction of the remaining weights pruned per round")
    p.add_argument("--rewind", default="pretrained", help="pretrained | step:K (weights after K steps of round 0)")
    p.add_argument("--scope", default="global", help="global | layer (magnitude ranking scope)")
    p.add_argument("--control", default="none", help="none | random-reinit | random-mask (after the lottery)")
    p.add_argument("--seed", type=int, default=0, help="seed of the controls' random masks / re-initialisation")
    _add_recipe_run_arguments(p, "the recipe's", "optimizer steps per round")
    p.set_defaults(func=_lottery)


def _bench(args: argparse.Namespace) -> int:
    from prune_trainer.bench import bench_models, format_report
    from prune_trainer.io import atomic_write_json

    modes = ("eager",) if args.no_compile else ("eager", "compile")
    report = bench_models(args.model_dir, args.baseline, tuple(args.batch_sizes), args.seq_len, tuple(args.threads),
                          modes, args.rounds, args.reps, progress=True, weights=not args.architecture_only)
    print(format_report(report))
    if args.json:
        atomic_write_json(args.json, report)
    return 0


def _add_bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="inference latency of a model folder, side by side with a baseline")
    p.add_argument("model_dir", help="model folder (an export of prune-trainer or any save_pretrained folder)")
    p.add_argument("--baseline", help="model folder to compare with (e.g. the dense model)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=5, help="rounds, the models alternating (default 5)")
    p.add_argument("--reps", type=int, default=3, help="forwards per model per round (default 3)")
    p.add_argument("--no-compile", action="store_true", help="eager only (skip torch.compile)")
    p.add_argument("--architecture-only", action="store_true",
                   help="time the architectures in the folders' config.json with random weights (no weight files)")
    p.add_argument("--json", help="write the report as JSON to this file")
    p.set_defaults(func=_bench)


def _oneshot(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from prune_trainer.oneshot.runner import OneShotConfig, run_oneshot

    if args.threads:
        torch.set_num_threads(args.threads)
    model_tag = args.model if args.model in ("embedded", "embedded-llm") else Path(args.model.rstrip("/\\")).name
    pattern, structures = _structure_args(args)
    sparsity = args.target if args.target is not None else args.sparsity
    options = {k: v for k, v in (("shots", args.shots), ("allocation", args.allocation)) if v is not None}
    level = "-".join(structures) if structures else pattern.replace(":", "of")
    cfg = OneShotConfig(
        model=args.model, method=args.method, sparsity=sparsity, pattern=pattern, owl=args.owl,
        owl_m=args.owl_m, owl_lambda=args.owl_lambda, owl_scope=args.owl_scope, calib_samples=args.calib_samples,
        seed=args.seed, calib_text=args.calib_text, eval_windows=args.eval_windows,
        eval_batch_size=args.eval_batch_size, export=not args.no_export,
        pruned_inputs=not args.dense_inputs, data_dir=args.data_dir, evaluate=not args.no_eval, device=args.device,
        task=args.task, targets=args.targets, eval_file=args.eval_file, max_length=args.max_length,
        calib_batch_size=args.calib_batch_size, options=options, structures=structures,
        output_dir=args.output_dir or f"results/oneshot/{model_tag}_{args.method}_{level}"
        f"_{sparsity}{'_owl' if args.owl else ''}_n{args.calib_samples}_seed{args.seed}",
    )
    res = run_oneshot(cfg)
    metrics = {k: v for k, v in res.items() if k.startswith("eval_") and not k.endswith(("_s", "_sentences"))}
    summary = {"task": res["task"], **metrics, **{k: res.get(k) for k in ("sparsity", "prune_time_s", "solve_time_s")}}
    print(json.dumps({"output_dir": cfg.output_dir, **summary}))
    return 0


def _structure_args(args: argparse.Namespace) -> tuple[str, list[str]]:
    """``--structure`` (``unstructured``, ``N:M`` or ``heads,ffn``) → ``(pattern, structures)``; without it,
    ``--pattern``. Both given and different is an error."""
    if args.structure is None:
        return args.pattern, []
    if args.pattern != "unstructured" and args.pattern != args.structure:
        raise ValueError(f"--structure {args.structure!r} and --pattern {args.pattern!r} disagree; give one")
    if args.structure == "unstructured" or ":" in args.structure:
        return args.structure, []
    return "unstructured", [s.strip() for s in args.structure.split(",") if s.strip()]


def _add_oneshot_parser(sub: argparse._SubParsersAction) -> None:
    from prune_trainer.tasks import TASKS

    p = sub.add_parser("oneshot", help="one-shot prune a fine-tuned model from calibration data, evaluate, export")
    p.add_argument("--model", required=True, help="fine-tuned model directory, 'embedded' or 'embedded-llm'")
    p.add_argument("--task", choices=sorted(TASKS), help="the checkpoint's head (default: from its architectures)")
    p.add_argument("--targets", nargs="+", metavar="REGEX",
                   help="regexes of the Linear names to prune (default: the model family's preset)")
    p.add_argument("--eval-file", help="sequence classification: JSON Lines of {text, label} to measure accuracy on; "
                   "causal LM: a text file for the perplexity (default: the CoNLL-2003 validation text); seq2seq: "
                   "JSON Lines of {source, target} (default: T5 span corruption of the validation text)")
    p.add_argument("--method", default="sparsegpt",
                   help="magnitude | wanda | sparsegpt | obs | llm-surgeon | k-obd | structured-obs | "
                   "structured-magnitude")
    p.add_argument("--sparsity", type=float, default=0.5, help="target sparsity (mean over layers with --owl)")
    p.add_argument("--target", type=float, default=None, help="same as --sparsity (LLM Surgeon's name)")
    p.add_argument("--pattern", default="unstructured", help="'unstructured' or N:M like 2:4")
    p.add_argument("--structure", default=None,
                   help="unstructured | N:M | heads,ffn (coupled structures: LLM Surgeon methods only)")
    p.add_argument("--shots", type=int, default=None, help="LLM Surgeon: shots T, curvature recomputed each")
    p.add_argument("--allocation", choices=["global", "uniform"], default=None,
                   help="LLM Surgeon: one cost threshold across layers (global) or per layer (uniform, default)")
    p.add_argument("--owl", action="store_true", help="OWL outlier-weighted layer-wise sparsity")
    p.add_argument("--owl-m", type=float, default=1.0, help="OWL outlier threshold M (default 1)")
    p.add_argument("--owl-lambda", type=float, default=None, help="bound layer sparsities to target ± lambda")
    p.add_argument("--owl-scope", choices=["linear", "block"], default="linear",
                   help="OWL outlier ratio per Linear (default) or per transformer block (Yin et al.; their LLaMA "
                   "settings: --owl-scope block --owl-m 5 --owl-lambda 0.08)")
    p.add_argument("--calib-samples", type=int, default=4096, help="calibration sentences from train (default 4096)")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration sample")
    p.add_argument("--max-length", "--seqlen", type=int, default=128, dest="max_length",
                   help="tokens per calibration sentence; causal LM, seq2seq: calibration and perplexity window "
                   "(default 128)")
    p.add_argument("--calib-text", help="causal LM, seq2seq: text source of the calibration windows: a text file, "
                   "conll-train or wikitext2-train (default: the CoNLL-2003 training text)")
    p.add_argument("--eval-windows", type=int, default=None,
                   help="causal LM: score only this many perplexity windows, evenly spaced (default: all)")
    p.add_argument("--eval-batch-size", type=int, default=64,
                   help="evaluation batch (causal LM: windows, capped at 1 GiB of logits; default 64)")
    p.add_argument("--calib-batch-size", type=int, default=32, help="calibration sequences per forward (default 32)")
    p.add_argument("--dense-inputs", action="store_true", help="feed each block the dense (unpruned) outputs")
    p.add_argument("--data-dir", help="CoNLL-2003 directory (default: $PRUNE_TRAINER_CONLL_DIR, else the hub)")
    p.add_argument("--output-dir", help="where model/ and results.json go (default: results/oneshot/<setting>)")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation (F1, accuracy, perplexity)")
    p.add_argument("--no-export", action="store_true", help="write results.json only, not the pruned model/")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    p.add_argument("--device", default="auto", help="auto (CUDA when available) | cpu | cuda | cuda:N")
    p.set_defaults(func=_oneshot)


def _export(args: argparse.Namespace) -> int:
    from prune_trainer.export.convert import convert_checkpoint

    quantize = None if args.quantize == "none" else args.quantize
    rows = None
    if args.trim_vocab:
        from transformers import AutoTokenizer

        from prune_trainer.data import load_conll_splits, used_token_ids

        train = load_conll_splits(args.data_dir)["train"]
        rows = used_token_ids(train, AutoTokenizer.from_pretrained(args.model_dir))
    report = convert_checkpoint(args.model_dir, args.output_dir, args.format, quantize, args.pattern,
                                args.embedding_rank, rows, args.embedding_quant)
    print(f"{args.output_dir}: format={args.format} quantize={args.quantize} "
          f"sparsity={report['global_sparsity']:.4f} weights {report['src_mib']:.2f} MiB -> {report['dst_mib']:.2f} "
          f"MiB ({report['src_mib'] / report['dst_mib']:.1f}x smaller)")
    return 0


def _onnx(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from prune_trainer.export.runtime import OrtTokenClassifier, export_onnx, quantize_onnx_int8
    from prune_trainer.export.structured import load_pruned_model

    out = Path(args.output)
    if args.quantize == "int8":
        fp32 = export_onnx(load_pruned_model(args.model_dir), out.with_name(out.stem + ".fp32.onnx"))
        try:
            quantize_onnx_int8(fp32, out)
        finally:
            fp32.unlink(missing_ok=True)
    else:
        export_onnx(load_pruned_model(args.model_dir), out)
    summary = {"onnx": str(out), "mib": round(out.stat().st_size / 2**20, 3), "quantize": args.quantize}
    if args.eval:
        from transformers import AutoTokenizer

        from prune_trainer.data import load_conll_splits
        from prune_trainer.oneshot.evaluation import evaluate_f1

        sentences = load_conll_splits(args.data_dir)["validation"]
        scores = evaluate_f1(OrtTokenClassifier(out, args.threads), AutoTokenizer.from_pretrained(args.model_dir),
                             sentences)
        summary["eval_f1"] = round(scores["f1"], 4)
    print(json.dumps(summary))
    return 0


def _add_export_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="re-save a model folder compressed: bitmask / N:M sparse, INT8 weights")
    p.add_argument("model_dir", help="a model folder (plain, structured or compressed export)")
    p.add_argument("output_dir", help="the new folder (written atomically)")
    p.add_argument("--format", default="bitmask", choices=["dense", "bitmask", "nm"])
    p.add_argument("--quantize", default="none", choices=["none", "int8"],
                   help="int8: per-output-channel symmetric INT8 Linear and embedding weights")
    p.add_argument("--pattern", help="N:M pattern for --format nm (default: the model's, else 2:4)")
    p.add_argument("--embedding-rank", type=int, help="store the word embeddings as rank-r SVD factors (lossy)")
    p.add_argument("--embedding-quant", choices=["int8", "int4"],
                   help="quantize the word embeddings (default: as --quantize); int4: groups of 128, fp16 scales")
    p.add_argument("--trim-vocab", action="store_true",
                   help="keep only the word-embedding rows of tokens in the training split (others load as [UNK])")
    p.add_argument("--data-dir", help="CoNLL-2003 directory for --trim-vocab (default: $PRUNE_TRAINER_CONLL_DIR)")
    p.set_defaults(func=_export)
    o = sub.add_parser("onnx", help="export a model folder to ONNX (optionally ONNX Runtime dynamic INT8)")
    o.add_argument("model_dir", help="a model folder (plain, structured or compressed export)")
    o.add_argument("output", help="the .onnx file to write")
    o.add_argument("--quantize", default="none", choices=["none", "int8"], help="int8: ORT dynamic quantization")
    o.add_argument("--eval", action="store_true", help="validation F1 through ONNX Runtime")
    o.add_argument("--data-dir", help="CoNLL-2003 directory (default: $PRUNE_TRAINER_CONLL_DIR, else the hub)")
    o.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads for --eval (default 2)")
    o.set_defaults(func=_onnx)


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand; user errors (bad recipe, data, model; a busy output folder; a diverged run) are printed
    as ``prune-trainer: error: ...`` with exit status 2, without a traceback."""
    import yaml

    from prune_trainer.io import RunInProgressError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError, ConnectionError, yaml.YAMLError,
            FloatingPointError, RunInProgressError) as err:
        print(f"prune-trainer: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
