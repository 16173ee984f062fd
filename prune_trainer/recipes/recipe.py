"""`Recipe`: a training recipe read from YAML, checked key by key and type by type before anything runs.

Keys: ``name``, ``task`` (`RECIPE_TASKS`: ``token-classification``, the default, CoNLL-2003 tagging with entity F1;
``causal-lm``, language modelling on plain text with perplexity), ``model``, ``init_from``, ``description``,
``output_dir``, ``data`` (`DataOptions`), ``training``
(`TrainingArguments` fields, checked by name and type, then by a dry `TrainingArguments` construction),
``pruning`` (given to `PruningConfig.from_dict`, or null for dense), ``distillation``, ``factorize_embeddings``
(a rank), ``on_nonfinite`` (``error`` | ``skip``, see `FiniteCheckCallback`) and ``bench`` (`BenchOptions`: time the
exported model against a baseline after the run, or null). An unknown key at any level is an error naming it, the
allowed keys and the closest ones.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prune_trainer.options import matches_type, unknown_key_error
from prune_trainer.yaml_io import load_yaml

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
NONFINITE_POLICIES = ("error", "skip")
RECIPE_TASKS = ("token-classification", "causal-lm")
"""The tasks a recipe trains: CoNLL-2003 tagging (`prune_trainer.recipes.runner`) or a causal LM on plain text
(`prune_trainer.recipes.lm_data`)."""
TOKEN_CLASSIFICATION_ONLY = ("factorize_embeddings", "distillation", "bench")
"""Recipe keys that only a token-classification recipe may set (they load or export BERT-style taggers)."""


def check_keys(given: Any, allowed: list[str] | set[str], where: str) -> None:
    """Raise ValueError for keys of ``given`` not in ``allowed``, naming the allowed and closest keys."""
    unknown = [key for key in given if key not in allowed]
    if unknown:
        raise unknown_key_error(where, unknown, allowed)


def type_matches(value: Any, annotation: Any) -> bool:
    """Whether a YAML value fits a type annotation (`matches_type`; classes YAML cannot produce, such as
    ``ParallelismConfig``, are accepted here and left to the constructor)."""
    return matches_type(value, annotation, lenient_classes=True)


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def check_training(training: Any, where: str) -> None:
    """``training`` must be a mapping of `TrainingArguments` fields whose values fit the fields' types."""
    from transformers import TrainingArguments

    if not isinstance(training, dict):
        raise ValueError(
            f"{where}: 'training' must be a mapping of TrainingArguments fields, got {type(training).__name__} "
            f"{training!r}"
        )
    hints = typing.get_type_hints(TrainingArguments)
    allowed = {f.name for f in dataclasses.fields(TrainingArguments) if f.init} - {"output_dir"}
    if "output_dir" in training:
        raise ValueError(f"{where}: training.output_dir is set by the runner; use the top-level 'output_dir'")
    check_keys(training, allowed, f"{where}: training")
    for key, value in training.items():
        if not type_matches(value, hints.get(key, Any)):
            raise ValueError(
                f"{where}: training.{key} = {value!r} is not a valid {_type_name(hints[key])}"
            )


@dataclass
class DataOptions:
    """Where the data comes from and how it is cut.

    Token classification: CoNLL-2003 from ``data_dir`` (or ``hub_dataset``), ``max_length`` sub-tokens per example
    (longer evaluation sentences are split into windows), the first ``max_*_samples`` sentences of each split.

    Causal LM: the texts ``train_text`` and ``eval_text`` (sources of `prune_trainer.data.text.load_text`:
    ``conll-train``, ``conll-validation``, ``wikitext2-*`` or a text file; CoNLL from ``data_dir``), cut into
    non-overlapping ``max_length``-token blocks; the first ``max_train_samples`` training blocks, and
    ``max_eval_samples`` evaluation windows evenly spaced over the text (`perplexity`'s ``max_windows``)."""

    data_dir: str | None = None
    hub_dataset: str = "eriktks/conll2003"
    max_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    train_text: str = "conll-train"
    eval_text: str = "conll-validation"

    @classmethod
    def from_dict(cls, data: Any, where: str) -> DataOptions:
        if data is None:
            return cls()
        if not isinstance(data, dict):
            raise ValueError(f"{where}: 'data' must be a mapping, got {type(data).__name__} {data!r}")
        check_keys(data, {f.name for f in dataclasses.fields(cls)}, f"{where}: data")
        opts = cls(**data)
        opts.validate(where)
        return opts

    def validate(self, where: str) -> None:
        hints = typing.get_type_hints(DataOptions)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not type_matches(value, hints[f.name]):
                raise ValueError(f"{where}: data.{f.name} = {value!r} is not a valid {_type_name(hints[f.name])}")
        for key in ("max_length", "max_train_samples", "max_eval_samples"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ValueError(f"{where}: data.{key} must be a positive integer, got {value!r}")
        for key in ("train_text", "eval_text"):
            if not getattr(self, key).strip():
                raise ValueError(f"{where}: data.{key} must name a text source, got {getattr(self, key)!r}")


@dataclass
class BenchOptions:
    """After export, time the exported model against ``baseline`` (a model path or hub id, or ``teacher``: the
    distillation teacher; default: the model the run started from, ``init_from`` or ``model``, except that a run
    starting from a pruned export times against its distillation teacher, the dense model)
    with `prune_trainer.bench.bench_models`, side by side in the same process; the speed-ups go into
    ``metrics.json`` as ``speedup_cpu_b<batch>`` (the first thread count and mode)."""

    baseline: str | None = None
    batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    seq_len: int = 128
    threads: list[int] = field(default_factory=lambda: [2])
    modes: list[str] = field(default_factory=lambda: ["eager"])
    rounds: int = 5
    reps: int = 3

    @classmethod
    def from_dict(cls, data: Any, where: str) -> BenchOptions | None:
        if data is None:
            return None
        if not isinstance(data, dict):
            raise ValueError(f"{where}: 'bench' must be a mapping or null, got {type(data).__name__} {data!r}")
        check_keys(data, {f.name for f in dataclasses.fields(cls)}, f"{where}: bench")
        opts = cls(**data)
        opts.validate(where)
        return opts

    def validate(self, where: str) -> None:
        from prune_trainer.bench import MODES

        hints = typing.get_type_hints(BenchOptions)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not type_matches(value, hints[f.name]):
                raise ValueError(f"{where}: bench.{f.name} = {value!r} is not a valid {_type_name(hints[f.name])}")
        for key in ("batch_sizes", "threads"):
            values = getattr(self, key)
            if not values or min(values) < 1:
                raise ValueError(f"{where}: bench.{key} must be a non-empty list of positive integers, got {values!r}")
        for key in ("seq_len", "rounds", "reps"):
            if getattr(self, key) < 1:
                raise ValueError(f"{where}: bench.{key} must be a positive integer, got {getattr(self, key)!r}")
        bad = [m for m in self.modes if m not in MODES]
        if not self.modes or bad:
            raise ValueError(f"{where}: bench.modes must be values of {list(MODES)}, got {self.modes!r}")


@dataclass
class Recipe:
    """One run: model, data, `TrainingArguments` fields, pruning and the rest (see the module docstring).

    ``recipe["key"]`` and ``recipe.get("key")`` read `to_dict` (for code written against dict recipes).
    """

    name: str
    task: str = "token-classification"
    model: str | None = None
    init_from: str | None = None
    description: str | None = None
    output_dir: str | None = None
    data: DataOptions = field(default_factory=DataOptions)
    training: dict[str, Any] = field(default_factory=dict)
    pruning: dict[str, Any] | None = None
    distillation: dict[str, Any] | None = None
    factorize_embeddings: int | None = None
    on_nonfinite: str = "error"
    bench: BenchOptions | None = None
    source: str = field(default="recipe", repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: Any, source: str = "recipe") -> Recipe:
        """Build and `validate` a recipe from a parsed YAML mapping; ``source`` names it in errors."""
        if not isinstance(data, dict):
            raise ValueError(f"{source} must be a mapping, got {type(data).__name__}")
        allowed = {f.name for f in dataclasses.fields(cls)} - {"source"}
        check_keys(data, allowed, source)
        if "name" not in data:
            raise ValueError(f"{source}: 'name' is required")
        values = dict(data)
        values["data"] = DataOptions.from_dict(values.get("data"), source)
        values["training"] = {} if values.get("training") is None else values["training"]
        values["bench"] = BenchOptions.from_dict(values.get("bench"), source)
        recipe = cls(**values, source=source)
        recipe.validate()
        return recipe

    def validate(self) -> None:
        """Check every field's type and value (training against `TrainingArguments`); raise ValueError."""
        where = self.source
        if not isinstance(self.name, str) or not self.name or "/" in self.name:
            raise ValueError(f"{where}: name must be a non-empty string without '/', got {self.name!r}")
        self._check_task(where)
        for key in ("model", "init_from", "description", "output_dir"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, str):
                raise ValueError(f"{where}: {key} must be a string, got {type(value).__name__} {value!r}")
        for key in ("pruning", "distillation"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, dict):
                raise ValueError(f"{where}: {key} must be a mapping or null, got {type(value).__name__} {value!r}")
        rank = self.factorize_embeddings
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
            raise ValueError(f"{where}: factorize_embeddings must be a positive integer rank, got {rank!r}")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"{where}: on_nonfinite must be one of {NONFINITE_POLICIES}, got {self.on_nonfinite!r}")
        self.data.validate(where)
        if self.bench is not None:
            self.bench.validate(where)
            if self.bench.baseline == "teacher" and not self.distillation:
                raise ValueError(f"{where}: bench.baseline is 'teacher' but the recipe has no distillation teacher")
        check_training(self.training, where)
        if self.distillation is not None:
            from prune_trainer.callbacks.distillation import check_distillation

            check_distillation(self.distillation, where)
        if self.pruning is not None:
            from prune_trainer.config import PruningConfig

            PruningConfig.from_dict(self.pruning)  # the method, its typed options and the schedule, checked here

    def _check_task(self, where: str) -> None:
        """``task`` is one of `RECIPE_TASKS`; a causal-LM recipe sets none of `TOKEN_CLASSIFICATION_ONLY`."""
        if self.task not in RECIPE_TASKS:
            raise ValueError(f"{where}: task must be one of {list(RECIPE_TASKS)}, got {self.task!r}")
        if self.task != "token-classification":
            given = [key for key in TOKEN_CLASSIFICATION_ONLY if getattr(self, key) is not None]
            if given:
                raise ValueError(f"{where}: {', '.join(given)} can only be used with task token-classification, "
                                 f"not {self.task!r}")

    def resolved_training(self) -> dict[str, Any]:
        """`DEFAULT_TRAINING` updated with the recipe's ``training``."""
        return {**DEFAULT_TRAINING, **self.training}

    def training_arguments(self, output_dir: str | os.PathLike, **extra: Any) -> Any:
        """`TrainingArguments` of this run, ``extra`` fields over the recipe's (constructing them writes nothing;
        bad values raise ValueError naming the recipe)."""
        from transformers import TrainingArguments

        try:
            return TrainingArguments(output_dir=str(output_dir), **{**self.resolved_training(), **extra})
        except (TypeError, ValueError) as err:
            raise ValueError(f"{self.source}: training: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        """Plain mapping of the fields (``data`` as a mapping), the recipe YAML's shape."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "source"}
        out["data"] = dataclasses.asdict(self.data)
        if self.task == "token-classification":
            # the task and text keys absent at their defaults: runs recorded before they existed keep their identity
            del out["task"]
            for key in ("train_text", "eval_text"):
                if out["data"][key] == DataOptions.__dataclass_fields__[key].default:
                    del out["data"][key]
        if self.bench is None:  # absent rather than null: runs recorded before the key existed keep their identity
            del out["bench"]
        else:
            out["bench"] = dataclasses.asdict(self.bench)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def __getitem__(self, key: str) -> Any:
        return self.to_dict()[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.to_dict().get(key, default)


def yaml_error_message(err: yaml.YAMLError, path: str | os.PathLike) -> str:
    """``<file>:<line>:<column>: <problem>`` for a YAML syntax error (lines and columns from 1)."""
    mark = getattr(err, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    return f"{where}: YAML syntax error: {problem}" + (f" ({context})" if context else "")


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
    try:
        parsed = load_yaml(value)
    except yaml.YAMLError as err:
        raise ValueError(f"override {item!r}: {yaml_error_message(err, '--set')}") from err
    if isinstance(parsed, int) and ":" in value:  # YAML 1.1 reads "2:4" as a base-60 integer
        parsed = value
    node[parts[-1]] = parsed


def load_recipe(
    path: str | os.PathLike,
    overrides: list[str] | None = None,
    *,
    model: str | None = None,
    name: str | None = None,
    output_dir: str | None = None,
    data_dir: str | None = None,
    max_steps: int | None = None,
) -> Recipe:
    """Read a recipe YAML, apply ``key.sub=value`` overrides, then the given fields (the CLI's flags); validate.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file (and line, for YAML
    syntax errors) for anything malformed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {str(path)!r} does not exist")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(yaml_error_message(err, path)) from err
    except UnicodeDecodeError as err:
        raise ValueError(f"recipe {path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must be a mapping, got {type(data).__name__}")
    data.setdefault("name", path.stem)
    for item in overrides or []:
        apply_override(data, item)
    recipe = Recipe.from_dict(data, source=f"recipe {path}")
    fields = {"model": model, "name": name, "output_dir": output_dir}
    recipe = dataclasses.replace(recipe, **{k: v for k, v in fields.items() if v is not None})
    if data_dir is not None:
        recipe.data = dataclasses.replace(recipe.data, data_dir=data_dir)
    if max_steps is not None:
        recipe.training = {**recipe.training, "max_steps": max_steps}
    recipe.validate()
    return recipe
