"""Recipe runner: YAML recipe → fine-tune (with or without pruning) → export → ``results/<name>/``.

A recipe has the keys ``name``, ``model``, ``init_from``, ``data``, ``training`` (any
`TrainingArguments` field), ``pruning`` (a `PruningConfig`, or null for dense), ``output_dir`` and
``factorize_embeddings`` (a rank r: train with the word embeddings replaced by their rank-r SVD factors
``A B``, deep-dive §5.1; the exported checkpoint holds the plain product, loadable as a standard BERT).
``--set a.b=value`` overrides any key (value parsed as YAML; ``2e-4`` is a float, `load_yaml`).

Besides F1 and sparsity, ``metrics.json`` records the run's costs: ``wall_time_s``, ``peak_rss_mib`` (peak
resident memory of the process, from ``getrusage``), ``pruning_time_s`` / ``pruning_steps`` (time spent in the
pruning callback's mask updates, over the whole run including resumed parts) and ``resumed_from_step``.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from prune_trainer.masking.selection import check_sparsity
from prune_trainer.yaml_io import load_yaml

RECIPE_KEYS = {
    "name", "model", "init_from", "data", "training", "pruning", "output_dir", "description", "distillation",
    "factorize_embeddings",
}
DATA_KEYS = {"data_dir", "hub_dataset", "max_length", "max_train_samples", "max_eval_samples"}

DEFAULT_TRAINING: dict[str, Any] = {
    "num_train_epochs": 3,
    "per_device_train_batch_size": 32,
    "per_device_eval_batch_size": 64,
    "learning_rate": 1e-4,
    "weight_decay": 0.01,
    "warmup_steps": 0,
    "logging_steps": 50,
    "eval_strategy": "epoch",
    "save_strategy": "steps",
    "save_steps": 200,
    "save_total_limit": 1,
    "report_to": "none",
    "seed": 42,
}


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> dict[str, Any]:
    """Read a recipe YAML and apply ``key.sub=value`` overrides; validate its keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(path)!r} does not exist")
    recipe = load_yaml(path.read_text()) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe {path} must be a mapping, got {type(recipe).__name__}")
    recipe.setdefault("name", path.stem)
    for item in overrides or []:
        apply_override(recipe, item)
    unknown = set(recipe) - RECIPE_KEYS
    if unknown:
        raise ValueError(f"recipe {path}: unknown key(s) {sorted(unknown)}; allowed: {sorted(RECIPE_KEYS)}")
    unknown = set(recipe.get("data") or {}) - DATA_KEYS
    if unknown:
        raise ValueError(f"recipe {path}: unknown data key(s) {sorted(unknown)}; allowed: {sorted(DATA_KEYS)}")
    return recipe


def apply_override(recipe: dict[str, Any], item: str) -> None:
    """Apply one ``dotted.key=value`` override in place (value parsed by `load_yaml`)."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key.sub=value")
    key, value = item.split("=", 1)
    node = recipe
    parts = key.split(".")
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ValueError(f"override {item!r}: {part!r} is not a mapping")
    parsed = load_yaml(value)
    if isinstance(parsed, int) and ":" in value:  # YAML 1.1 reads "2:4" as a base-60 integer
        parsed = value
    node[parts[-1]] = parsed


def git_commit() -> str:
    """Current commit of the project checkout (``+dirty`` when there are uncommitted changes)."""
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


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


def last_checkpoint_step(ckpt_dir: str | os.PathLike) -> int | None:
    """Global step of the newest ``checkpoint-<step>`` folder in ``ckpt_dir`` (None when there is none)."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return None
    steps = [
        int(p.name.split("-", 1)[1])
        for p in ckpt_dir.iterdir()
        if p.is_dir() and p.name.startswith("checkpoint-") and p.name.split("-", 1)[1].isdigit()
    ]
    return max(steps) if steps else None


def run_recipe(recipe: dict[str, Any], results_root: str | os.PathLike = "results") -> dict[str, Any]:
    """Run a recipe end to end; return the metrics written to ``<output_dir>/metrics.json``."""
    from transformers import DataCollatorForTokenClassification, Trainer, TrainingArguments, set_seed

    from prune_trainer.callbacks import SparsityLoggingCallback, make_pruning_callback
    from prune_trainer.config import PruningConfig
    from prune_trainer.data import (
        load_conll_splits,
        make_compute_metrics,
        preprocess_logits_for_metrics,
        tokenize_and_align,
    )
    from prune_trainer.export import export_pruned_model
    from prune_trainer.factorization import factorize_word_embeddings, merge_word_embeddings
    from prune_trainer.models import load_model_and_tokenizer, resolve_model_path

    start = time.time()
    commit = git_commit()  # the code that runs is the code checked out now
    recipe = copy.deepcopy(recipe)
    name = recipe["name"]
    out_dir = Path(recipe.get("output_dir") or Path(results_root) / name)
    data_cfg = recipe.get("data") or {}
    training = {**DEFAULT_TRAINING, **(recipe.get("training") or {})}
    pruning_cfg = PruningConfig.from_dict(recipe["pruning"]) if recipe.get("pruning") else None

    # Everything that can be checked before training is checked before anything is written.
    model_src = recipe.get("init_from") or recipe.get("model")
    try:
        model_src = resolve_model_path(model_src)  # a missing model directory fails here, before the data is read
    except FileNotFoundError as err:
        if recipe.get("init_from"):
            raise FileNotFoundError(
                f"init_from: {err}. This recipe starts from a fine-tuned model: train it first (the pruning "
                "recipes start from results/dense/model, written by `prune-trainer run recipes/dense.yaml`)"
            ) from err
        raise
    splits = load_conll_splits(data_cfg.get("data_dir"), data_cfg.get("hub_dataset", "eriktks/conll2003"))
    # A checkpoint without a token-classification head (the embedded model, bert-base-cased) gets a new one drawn
    # from the global RNG: seed it first, as HF's example scripts do, so the same recipe trains the same run.
    set_seed(int(training["seed"]))
    model, tokenizer = load_model_and_tokenizer(model_src)
    embedding_rank = recipe.get("factorize_embeddings")
    if embedding_rank is not None:
        if isinstance(embedding_rank, bool) or not isinstance(embedding_rank, int):
            raise ValueError(f"factorize_embeddings must be an integer rank, got {embedding_rank!r}")
        factorize_word_embeddings(model, embedding_rank)
    max_length = int(data_cfg.get("max_length", 128))
    train_ds = tokenize_and_align(splits["train"], tokenizer, max_length, data_cfg.get("max_train_samples"))
    eval_sets = {
        split: tokenize_and_align(splits[split], tokenizer, max_length, data_cfg.get("max_eval_samples"))
        for split in ("validation", "test")
        if split in splits
    }
    callbacks = []
    pruner = None
    if pruning_cfg is not None:
        check_sparsity(pruning_cfg.schedule.final_sparsity, "final_sparsity")
        pruner = make_pruning_callback(model, pruning_cfg)
        callbacks += [pruner, SparsityLoggingCallback(model)]
    if recipe.get("distillation"):  # {teacher: <path> | "init_from", alpha, temperature}
        from prune_trainer.callbacks.distillation import make_distillation_callback

        callbacks.append(make_distillation_callback(model, recipe["distillation"], recipe.get("init_from")))

    if "wandb" in str(training.get("report_to")):
        os.environ.setdefault("WANDB_MODE", "offline" if not os.environ.get("WANDB_API_KEY") else "online")
        os.environ.setdefault("WANDB_DIR", str(out_dir))
        os.environ.setdefault("WANDB_PROJECT", "prune_trainer")
        training.setdefault("run_name", name)

    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = out_dir / "checkpoints"
    args = TrainingArguments(output_dir=str(ckpt_dir), **training)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_sets["validation"],
        data_collator=DataCollatorForTokenClassification(tokenizer),
        processing_class=tokenizer,
        compute_metrics=make_compute_metrics(),
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        callbacks=callbacks,
    )
    resumed_from = last_checkpoint_step(ckpt_dir)
    train_out = trainer.train(resume_from_checkpoint=True if resumed_from is not None else None)

    metrics: dict[str, Any] = {"name": name}
    for split, ds in eval_sets.items():
        prefix = "eval" if split == "validation" else "test"
        res = trainer.evaluate(ds, metric_key_prefix=prefix)
        metrics.update({k: v for k, v in res.items() if k.startswith(prefix + "_")})

    if embedding_rank is not None:
        merge_word_embeddings(model)  # plain nn.Embedding holding A B: a standard checkpoint
    report = export_pruned_model(
        model,
        out_dir / "model",
        tokenizer,
        method=pruning_cfg.method if pruning_cfg else "dense",
        pattern=pruning_cfg.schedule.pattern if pruning_cfg else "unstructured",
        config=recipe,
    )
    wall = time.time() - start
    metrics.update(
        {
            "sparsity": report["global_sparsity"],
            "sparsity_per_layer": report["per_layer"],
            "train_loss": train_out.training_loss,
            "train_steps": trainer.state.global_step,
            "resumed_from_step": resumed_from or 0,
            "wall_time_s": round(wall, 1),
            "pruning_time_s": round(pruner.pruning_time_s, 6) if pruner is not None else 0.0,
            "pruning_steps": pruner.pruning_steps if pruner is not None else 0,
            "peak_rss_mib": peak_rss_mib(),
            "git_commit": commit,
            "device": _device_name(),
            "command": " ".join(sys.argv),
            "config": {**recipe, "training": training},
            "log_history": trainer.state.log_history,
        }
    )
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, default=str))
    (out_dir / "config.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    (out_dir / "README.md").write_text(results_markdown(metrics))
    return metrics


def results_markdown(metrics: dict[str, Any]) -> str:
    """A short Markdown summary of one run."""
    lines = [
        f"# {metrics['name']}",
        "",
        "| metric | value |",
        "|---|---|",
    ]
    keys = ("eval_f1", "eval_precision", "eval_recall", "test_f1", "sparsity", "train_steps", "wall_time_s",
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
