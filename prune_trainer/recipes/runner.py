"""Recipe runner: YAML recipe (`Recipe`) → fine-tune (with or without pruning) → export → ``results/<name>/``.

A recipe has the keys ``name``, ``task`` (``token-classification``: CoNLL-2003 tagging, entity F1; ``causal-lm``:
a causal LM on plain text, perplexity, `prune_trainer.recipes.lm_data`), ``model``, ``init_from``, ``data``,
``training`` (any
`TrainingArguments` field), ``pruning`` (a `PruningConfig`, or null for dense), ``output_dir``,
``factorize_embeddings`` (a rank r: train with the word embeddings replaced by their rank-r SVD factors
``A B``, as ALBERT's factorized embeddings, Lan et al. 2020; the exported checkpoint holds the plain product,
loadable as a standard BERT) and
``on_nonfinite`` (``error``: a NaN/inf loss or gradient stops the run, nothing is exported; ``skip``).
``--set a.b=value`` overrides any key (value parsed as YAML; ``2e-4`` is a float, `load_yaml`).

Everything that can be checked is checked before anything is written. A run holds ``<out>/.lock``, saves its
resolved recipe in ``run_config.json`` (a resume with another recipe is an error; ``overwrite=True`` starts
over), resumes from the newest *complete* checkpoint, and writes ``model/`` (atomically), ``config.yaml``,
``README.md`` and last ``metrics.json``: a run is done exactly when `run_is_complete`.

Besides the task's metrics (``eval_f1`` ...; ``eval_perplexity``, ``eval_nll``, ``eval_tokens``, ``eval_windows``
for a causal LM) and sparsity, ``metrics.json`` records the run's costs: ``wall_time_s`` (summed over resumed parts),
``train_loss`` (mean over every step of the run), ``peak_rss_mib`` (peak resident memory of the process, from
``getrusage``), ``pruning_time_s`` / ``pruning_steps`` (time spent in the pruning callback's mask updates, over
the whole run including resumed parts) and ``resumed_from_step``.

A run may start from a structured export (heads / FFN neurons sliced away, `prune_trainer.recipes.pruned_start`):
it trains the sliced model; with ``pruning: null`` the export keeps its per-layer sizes and ``sparsity`` is
measured against the start model (with ``params`` and ``start_params``). ``bench`` then times against the
distillation teacher by default (the dense model), not against the pruned start model.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prune_trainer.io import atomic_write_json, atomic_write_text
from prune_trainer.provenance import git_commit
from prune_trainer.recipes.recipe import DEFAULT_TRAINING, Recipe, apply_override, load_recipe
from prune_trainer.recipes.run_dir import (
    METRICS_FILE,
    RunStateCallback,
    check_run_identity,
    exclusive_lock,
    incomplete_checkpoints,
    last_checkpoint_step,
    run_is_complete,
)

__all__ = [
    "DEFAULT_TRAINING", "Recipe", "apply_override", "last_checkpoint_step", "load_recipe", "run_is_complete",
    "run_recipe",
]


def _device_name() -> str:
    """The device Trainer picks (the first GPU when there is one), described."""
    from prune_trainer.devices import device_description, resolve_device

    return device_description(resolve_device("auto"))


def peak_rss_mib() -> float | None:
    """Peak resident set size of this process so far in MiB (``getrusage``), or None where unavailable.

    Linux reports ``ru_maxrss`` in KiB, macOS in bytes. It is the peak of the whole process: run one recipe
    per process (as ``prune-trainer reproduce`` does) for a per-run figure.
    """
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (1024 * 1024 if sys.platform == "darwin" else 1024), 1)


def planned_max_steps(args: Any, n_train: int) -> int:
    """Optimizer steps the Trainer will run: ``max_steps`` if set, else ``⌈epochs · U⌉`` with
    ``U = max(⌈L / accumulation⌉, 1)`` updates per epoch and ``L`` batches per rank (``⌈n / world⌉`` samples per
    rank, divided by the batch size, rounded down with ``dataloader_drop_last``), as `Trainer` computes it."""
    if args.max_steps > 0:
        return int(args.max_steps)
    per_rank = math.ceil(n_train / max(int(args.world_size), 1))
    batch = int(args.per_device_train_batch_size)
    batches = per_rank // batch if args.dataloader_drop_last else math.ceil(per_rank / batch)
    accumulation = int(args.gradient_accumulation_steps)
    updates = max(batches // accumulation + int(batches % accumulation > 0), 1)
    return math.ceil(float(args.num_train_epochs) * updates)


def check_training_plan(args: Any, pruning_cfg: Any, n_train: int) -> int:
    """Validate the run's sizes and its pruning schedule against its length; return its ``max_steps``."""
    for key in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        if int(getattr(args, key)) < 1:
            raise ValueError(f"training.{key} must be at least 1, got {getattr(args, key)!r}")
    max_steps = planned_max_steps(args, n_train)
    if max_steps < 1:
        raise ValueError(f"the run has no optimizer step (num_train_epochs={args.num_train_epochs})")
    if pruning_cfg is None:
        return max_steps
    if args.load_best_model_at_end:
        raise ValueError(
            "training.load_best_model_at_end cannot be used with pruning: the best checkpoint may predate the final "
            "sparsity, so the exported model would not be the pruned one"
        )
    schedule = pruning_cfg.schedule
    for key in ("start_step", "end_step"):
        value = getattr(schedule, key)
        if isinstance(value, int) and value > max_steps:
            source = "training.max_steps" if args.max_steps > 0 else (
                f"{n_train} sentences, batch {args.per_device_train_batch_size}, accumulation "
                f"{args.gradient_accumulation_steps}, {args.num_train_epochs} epochs"
            )
            raise ValueError(
                f"pruning.schedule.{key}={value} is past the run's last step (max_steps={max_steps}, from {source}); "
                "lower it or use a fraction"
            )
    schedule.resolve(max_steps)  # start_step after end_step fails here
    return max_steps


def _resolve_source(recipe: Recipe) -> str:
    """The model directory or hub id the run starts from (``init_from`` over ``model``), checked."""
    from prune_trainer.models import resolve_model_path

    try:
        return resolve_model_path(recipe.init_from or recipe.model)
    except FileNotFoundError as err:
        if recipe.init_from:
            raise FileNotFoundError(
                f"init_from: {err}. This recipe starts from a fine-tuned model: train it first (the pruning "
                "recipes start from results/dense/model, written by `prune-trainer run recipes/dense.yaml`)"
            ) from err
        raise


def _check_model_config(model_src: str, max_length: int) -> None:
    """Label count of a classifier checkpoint and ``max_length`` against ``max_position_embeddings``."""
    from prune_trainer.models import check_model_labels, load_model_config

    config = load_model_config(model_src)
    check_model_labels(config, model_src)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and max_length > positions:
        raise ValueError(
            f"data.max_length={max_length} is above the model's max_position_embeddings={positions} ({model_src})"
        )


def _start_run_dir(out_dir: Path, resolved: dict[str, Any], overwrite: bool) -> None:
    """With the lock held: ``overwrite`` empties the folder (but the lock); the run identity is checked; an old
    ``metrics.json`` is removed (the run is done again only when this run writes it)."""
    if overwrite:
        for child in out_dir.iterdir():
            if child.name != ".lock":
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    check_run_identity(out_dir, resolved)
    (out_dir / METRICS_FILE).unlink(missing_ok=True)


def _drop_incomplete_checkpoints(ckpt_dir: Path, pruned: bool) -> None:
    """Delete checkpoints a kill left half-written: the Trainer would otherwise rotate the good ones away."""
    for path, why in incomplete_checkpoints(ckpt_dir, pruned):
        print(f"removing incomplete checkpoint {path} ({why})")
        shutil.rmtree(path)


def _restore_finished_training(trainer: Any, ckpt: Path) -> None:
    """Load a checkpoint taken at the run's last step without training: `Trainer.train` resumed there would take
    one more optimizer step. Weights, Trainer state and the callbacks' state (``on_train_begin``) are restored,
    then ``on_train_end`` runs as at the end of training (a schedule ending at the last step applies its mask)."""
    from transformers import TrainerState

    trainer._load_from_checkpoint(str(ckpt))  # what `train(resume_from_checkpoint=...)` loads the weights with
    trainer.state = TrainerState.load_from_json(str(ckpt / "trainer_state.json"))
    handler = trainer.callback_handler
    trainer.control = handler.on_train_begin(trainer.args, trainer.state, trainer.control)
    trainer.control = handler.on_train_end(trainer.args, trainer.state, trainer.control)


@dataclass
class _TaskData:
    """What a task gives a run: the model, its tokenizer, the training set, the Trainer's task arguments (evaluation
    set, collator, metrics) and ``evaluate(trainer)``: the final metrics of the trained model, before the export."""

    model: Any
    tokenizer: Any
    train_ds: Any
    trainer_kwargs: dict[str, Any]
    evaluate: Callable[[Any], dict[str, Any]]


@dataclass
class _Run:
    """Everything a run needs once its inputs are checked (built by `_prepare`, before anything is written)."""

    recipe: Recipe
    out_dir: Path
    training: dict[str, Any]
    args: Any
    task: _TaskData
    pruning_cfg: Any
    pruner: Any
    callbacks: list[Any]
    resolved: dict[str, Any]
    max_steps: int
    start_kind: str | None = None
    """`pruned_export_kind` of the start model (``"structured"`` for a sliced export, else None)."""
    start_counts: dict[str, int] | None = None
    """Weights of the start model's layer Linears (a structured start), the reference of ``sparsity``."""
    start_params: int | None = None
    bench_baseline: str | None = None

    @property
    def model(self) -> Any:
        return self.task.model

    @property
    def tokenizer(self) -> Any:
        return self.task.tokenizer

    @property
    def ckpt_dir(self) -> Path:
        return self.out_dir / "checkpoints"


def _prepare(recipe: Recipe, results_root: str | os.PathLike) -> _Run:
    """Check every input, load model and data (`TASK_LOADERS`), build the callbacks; nothing is written here."""
    from transformers import set_seed

    from prune_trainer.config import PruningConfig
    from prune_trainer.recipes.pruned_start import check_pruned_start, layer_linear_counts

    out_dir = Path(recipe.output_dir or Path(results_root) / recipe.name)
    training = recipe.resolved_training()
    pruning_cfg = PruningConfig.from_dict(recipe.pruning) if recipe.pruning else None
    extra: dict[str, Any] = {}
    if "wandb" in str(training.get("report_to")):
        os.environ.setdefault("WANDB_MODE", "offline" if not os.environ.get("WANDB_API_KEY") else "online")
        os.environ.setdefault("WANDB_DIR", str(out_dir))
        os.environ.setdefault("WANDB_PROJECT", "prune_trainer")
        extra["run_name"] = training.setdefault("run_name", recipe.name)
    args = recipe.training_arguments(out_dir / "checkpoints", **extra)
    model_src = _task_source(recipe)  # a missing model fails here, before the data is read
    start_kind = check_pruned_start(model_src, pruning_cfg)  # a compressed start, or more groups on emptied layers
    bench_baseline = _bench_baseline(recipe, model_src, start_kind)
    # A checkpoint without a token-classification head (the embedded model, bert-base-cased) gets a new one drawn
    # from the global RNG: seed it first, as HF's example scripts do, so the same recipe trains the same run.
    set_seed(int(training["seed"]))
    task = TASK_LOADERS[recipe.task](recipe, model_src, args)
    max_steps = check_training_plan(args, pruning_cfg, len(task.train_ds))
    model = task.model
    start_counts = layer_linear_counts(model) if start_kind == "structured" else None  # before any wrapping
    start_params = sum(p.numel() for p in model.parameters()) if start_kind == "structured" else None
    pruner, callbacks = _make_callbacks(recipe, model, pruning_cfg)
    resolved = {**recipe.to_dict(), "model_path": model_src, "training": training, "max_steps": max_steps}
    resolved.pop("description")  # the run's identity: everything that changes what it computes
    return _Run(recipe, out_dir, training, args, task, pruning_cfg, pruner, callbacks, resolved, max_steps,
                start_kind, start_counts, start_params, bench_baseline)


def _task_source(recipe: Recipe) -> str:
    """The start model of the recipe's task, checked (`_resolve_source`; `resolve_lm_source` for a causal LM)."""
    if recipe.task == "causal-lm":
        from prune_trainer.recipes.lm_data import resolve_lm_source

        return resolve_lm_source(recipe)
    model_src = _resolve_source(recipe)
    _check_model_config(model_src, recipe.data.max_length)
    return model_src


def _load_token_classification(recipe: Recipe, model_src: str, args: Any) -> _TaskData:
    """CoNLL-2003 tagging: the tagger, its sub-token datasets and entity-F1 evaluation of validation (and test,
    long sentences scored in windows stitched back, `window_sentences`)."""
    from transformers import DataCollatorForTokenClassification

    from prune_trainer.data import (
        load_conll_splits,
        make_compute_metrics,
        preprocess_logits_for_metrics,
        tokenize_and_align,
        window_sentences,
    )
    from prune_trainer.factorization import factorize_word_embeddings
    from prune_trainer.models import load_model_and_tokenizer

    data_cfg = recipe.data
    splits = load_conll_splits(data_cfg.data_dir, data_cfg.hub_dataset)
    model, tokenizer = load_model_and_tokenizer(model_src)
    if recipe.factorize_embeddings is not None:
        factorize_word_embeddings(model, recipe.factorize_embeddings)
    max_length = data_cfg.max_length
    train_ds = tokenize_and_align(splits["train"], tokenizer, max_length, data_cfg.max_train_samples)
    eval_sets = {}  # split → (dataset, window groups)
    for split in ("validation", "test"):
        if split in splits:
            windows, groups = window_sentences(splits[split][: data_cfg.max_eval_samples], tokenizer, max_length)
            eval_sets[split] = (tokenize_and_align(windows, tokenizer, max_length), groups)
    kwargs = {
        "eval_dataset": eval_sets["validation"][0],
        "data_collator": DataCollatorForTokenClassification(tokenizer),
        "compute_metrics": make_compute_metrics(groups=eval_sets["validation"][1]),
        "preprocess_logits_for_metrics": preprocess_logits_for_metrics,
    }
    return _TaskData(model, tokenizer, train_ds, kwargs, functools.partial(_evaluate_tagger, eval_sets))


def _evaluate_tagger(eval_sets: dict[str, tuple[Any, list[int]]], trainer: Any) -> dict[str, Any]:
    """Entity F1 (precision, recall, loss) of the trained tagger on validation (``eval_*``) and test (``test_*``)."""
    from prune_trainer.data import make_compute_metrics

    metrics: dict[str, Any] = {}
    for split, (ds, groups) in eval_sets.items():
        prefix = "eval" if split == "validation" else "test"
        trainer.compute_metrics = make_compute_metrics(groups=groups)
        res = trainer.evaluate(ds, metric_key_prefix=prefix)
        metrics.update({k: v for k, v in res.items() if k.startswith(prefix + "_")})
    return metrics


def _load_causal_lm(recipe: Recipe, model_src: str, args: Any) -> _TaskData:
    """A causal LM on plain text (`prune_trainer.recipes.lm_data`): blocks to train on, windows to evaluate, and
    the final perplexity of the trained model."""
    from prune_trainer.recipes.lm_data import evaluate_lm, lm_trainer_kwargs, load_lm_task

    model, tokenizer, lm = load_lm_task(recipe, model_src)
    batch = int(args.per_device_eval_batch_size)
    return _TaskData(model, tokenizer, lm.train_ds, lm_trainer_kwargs(lm),
                     lambda trainer: evaluate_lm(model, lm, batch))


TASK_LOADERS: dict[str, Callable[[Recipe, str, Any], _TaskData]] = {
    "token-classification": _load_token_classification,
    "causal-lm": _load_causal_lm,
}
"""Recipe task (`RECIPE_TASKS`) → what loads its model and data."""


def _make_callbacks(recipe: Recipe, model: Any, pruning_cfg: Any) -> tuple[Any, list[Any]]:
    """The pruning callback (or None) and every callback of the run: pruning, distillation, finite checks."""
    from prune_trainer.callbacks import make_pruning_callback
    from prune_trainer.callbacks.finite import FiniteCheckCallback

    callbacks: list[Any] = []
    pruner = None
    if pruning_cfg is not None:
        pruner = make_pruning_callback(model, pruning_cfg)
        callbacks.append(pruner)
    if recipe.distillation:  # {teacher: <path> | "init_from", alpha, temperature}
        from prune_trainer.callbacks.distillation import make_distillation_callback

        callbacks.append(make_distillation_callback(model, recipe.distillation, recipe.init_from))
    callbacks.append(FiniteCheckCallback(recipe.on_nonfinite))
    return pruner, callbacks


def _teacher_source(recipe: Recipe) -> str | None:
    """The distillation teacher's path or hub id as given (``init_from`` resolved), or None without distillation."""
    if not recipe.distillation:
        return None
    teacher = recipe.distillation.get("teacher", "init_from")
    return recipe.init_from if teacher == "init_from" else teacher


def _bench_baseline(recipe: Recipe, model_src: str, start_kind: str | None) -> str | None:
    """The model ``bench`` times the export against, checked before the run: ``bench.baseline`` (a path, or
    ``teacher``: the distillation teacher); by default the start model, or the teacher when the start model is
    itself a pruned export (the speed-up that matters is against the dense model)."""
    from prune_trainer.models import resolve_model_path

    opts = recipe.bench
    if opts is None:
        return None
    teacher = _teacher_source(recipe)  # bench.baseline 'teacher' without distillation is refused by Recipe
    if opts.baseline is None and not (start_kind and teacher):
        return model_src
    baseline = teacher if opts.baseline in (None, "teacher") else opts.baseline
    try:
        return resolve_model_path(baseline)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"bench.baseline: {err}") from err


def _train(run: _Run, resumed_from: int | None, start: float) -> tuple[Any, dict[str, float]]:
    """Train (resuming from checkpoint ``resumed_from``); return the Trainer and the whole run's totals."""
    from transformers import Trainer

    from prune_trainer.callbacks import SparsityLoggingCallback

    resume_path = run.ckpt_dir / f"checkpoint-{resumed_from}" if resumed_from is not None else None
    run_state = RunStateCallback.from_checkpoint(resume_path, start)
    trainer = Trainer(
        model=run.model,
        args=run.args,
        train_dataset=run.task.train_ds,
        processing_class=run.tokenizer,
        callbacks=[*run.callbacks, run_state],
        **run.task.trainer_kwargs,
    )
    run_state.attach(trainer)
    if run.pruner is not None:
        SparsityLoggingCallback(run.pruner).install(trainer)  # ahead of the reporters (W&B, ...)
    if resumed_from is not None and resumed_from >= run.max_steps:
        _restore_finished_training(trainer, resume_path)
        part_loss_sum = 0.0
    else:
        train_out = trainer.train(resume_from_checkpoint=str(resume_path) if resume_path is not None else None)
        part_loss_sum = train_out.training_loss * (trainer.state.global_step - (resumed_from or 0))
    return trainer, run_state.totals(part_loss_sum)


def _evaluate_and_export(run: _Run, trainer: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The task's final metrics of the trained model (`_TaskData.evaluate`), then the exported ``model/``; return
    both."""
    from prune_trainer.callbacks.structured import GroupPruningCallback
    from prune_trainer.export import export_pruned_model
    from prune_trainer.factorization import merge_word_embeddings
    from prune_trainer.recipes.pruned_start import fixed_structure_report

    metrics: dict[str, Any] = {"name": run.recipe.name, **run.task.evaluate(trainer)}
    if run.recipe.factorize_embeddings is not None:
        merge_word_embeddings(run.model)  # plain nn.Embedding holding A B: a standard checkpoint
    if isinstance(run.pruner, GroupPruningCallback):  # heads / FFN neurons removed: export the smaller model
        report = _export_structured(run)
    elif run.start_kind == "structured" and run.pruner is None:  # a sliced model fine-tuned at a fixed structure
        export_pruned_model(run.model, run.out_dir / "model", run.tokenizer, method="dense",
                            config=run.recipe.to_dict())
        report = fixed_structure_report(run.start_counts, run.start_params, run.out_dir / "model")
    else:
        report = export_pruned_model(
            run.model,
            run.out_dir / "model",
            run.tokenizer,
            method=run.pruning_cfg.method if run.pruning_cfg else "dense",
            pattern=run.pruning_cfg.pattern if run.pruning_cfg else "unstructured",
            config=run.recipe.to_dict(),
        )
    return metrics, report


def _export_structured(run: _Run) -> dict[str, Any]:
    """Slice the removed heads and FFN neurons away (`export_structured_model`) and measure on the reloaded export
    (`load_pruned_model`) what fraction of each coupled Linear's weights is gone: ``global_sparsity`` is
    ``1 − Σ kept / Σ dense`` over the coupled Linears, ``per_layer`` the same per Linear; ``params`` counts the
    exported model's parameters and ``model_mib`` its weight file."""
    from prune_trainer.bench import weights_mib
    from prune_trainer.export.structured import export_structured_model, load_pruned_model
    from prune_trainer.export.sublayers import linear_weight_count

    names = run.pruner.structures.linear_names()
    dense = {n: run.pruner.layers[n].weight.numel() for n in names}
    sizes = export_structured_model(run.model, run.out_dir / "model", run.tokenizer)
    exported = load_pruned_model(run.out_dir / "model")
    kept = {n: linear_weight_count(exported, n) for n in names}  # 0 in a removed sublayer
    return {
        "global_sparsity": 1.0 - sum(kept.values()) / sum(dense.values()),
        "per_layer": {n: 1.0 - kept[n] / dense[n] for n in names},
        "structure": sizes,
        "params": sum(p.numel() for p in exported.parameters()),
        "model_mib": weights_mib(run.out_dir / "model"),
        **({"start_params": run.start_params} if run.start_params is not None else {}),
    }


def _bench(run: _Run) -> dict[str, Any]:
    """Time the exported model against the bench baseline (`BenchOptions`); the metrics it adds."""
    from prune_trainer.bench import bench_models, speedup_metrics

    opts = run.recipe.bench
    baseline = run.bench_baseline
    print(f"bench: {run.out_dir / 'model'} against {baseline}")
    report = bench_models(  # loads and times both models on the CPU
        run.out_dir / "model", baseline, batch_sizes=tuple(opts.batch_sizes), seq_len=opts.seq_len,
        threads=tuple(opts.threads), modes=tuple(opts.modes), rounds=opts.rounds, reps=opts.reps,
    )
    return speedup_metrics(report)


def run_recipe(
    recipe: Recipe | dict[str, Any], results_root: str | os.PathLike = "results", overwrite: bool = False
) -> dict[str, Any]:
    """Run a recipe end to end (resuming an interrupted run of it); return the metrics written to
    ``<output_dir>/metrics.json``. ``overwrite``: delete an existing output folder first and start over."""
    start = time.time()
    commit = git_commit()  # the code that runs is the code checked out now
    recipe = Recipe.from_dict(copy.deepcopy(recipe)) if isinstance(recipe, dict) else copy.deepcopy(recipe)
    run = _prepare(recipe, results_root)  # everything that can be checked is checked before anything is written
    pruner, out_dir = run.pruner, run.out_dir
    main_process = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 owns the folder
    with exclusive_lock(out_dir / ".lock") if main_process else contextlib.nullcontext():
        if main_process:
            _start_run_dir(out_dir, run.resolved, overwrite)
            _drop_incomplete_checkpoints(run.ckpt_dir, pruned=pruner is not None)
        resumed_from = last_checkpoint_step(run.ckpt_dir, pruned=pruner is not None)
        trainer, totals = _train(run, resumed_from, start)
        metrics, report = _evaluate_and_export(run, trainer)
        metrics.update(
            {
                "sparsity": report["global_sparsity"],
                "sparsity_per_layer": report["per_layer"],
                **{k: report[k] for k in ("structure", "params", "start_params", "model_mib") if k in report},
                "train_loss": totals["train_loss_sum"] / max(trainer.state.global_step, 1),
                "train_steps": trainer.state.global_step,
                "resumed_from_step": resumed_from or 0,
                "wall_time_s": round(totals["wall_time_s"], 1),
                "pruning_time_s": round(pruner.pruning_time_s, 6) if pruner is not None else 0.0,
                "pruning_steps": pruner.pruning_steps if pruner is not None else 0,
                "peak_rss_mib": peak_rss_mib(),
                "git_commit": commit,
                "device": _device_name(),
                "command": " ".join(sys.argv),
                "config": {**recipe.to_dict(), "training": run.training},
                "log_history": trainer.state.log_history,
            }
        )
        if recipe.bench is not None and main_process:
            metrics.update(_bench(run))
        atomic_write_text(out_dir / "config.yaml", recipe.to_yaml())
        atomic_write_text(out_dir / "README.md", results_markdown(metrics))
        atomic_write_json(out_dir / METRICS_FILE, metrics)  # last: its presence marks the run done
    return metrics


def results_markdown(metrics: dict[str, Any]) -> str:
    """A short Markdown summary of one run."""
    lines = [
        f"# {metrics['name']}",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    keys = ("eval_f1", "eval_precision", "eval_recall", "test_f1", "eval_perplexity", "eval_nll", "eval_tokens",
            "eval_windows", "sparsity", "train_steps", "wall_time_s",
            "pruning_time_s", "peak_rss_mib")
    for key in keys:
        if key in metrics:
            value = metrics[key]
            lines.append(f"| {key} | {value:.4f} |" if isinstance(value, float) else f"| {key} | {value} |")
    lines += [
        "",
        f"- command: `{metrics['command']}`",
        f"- git commit: `{metrics['git_commit']}`",
        f"- device: {metrics['device']}",
        "",
    ]
    return "\n".join(lines)
