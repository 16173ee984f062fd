"""The one-shot job: load a fine-tuned model with its own head → (OWL allocation) → sequential calibration +
pruning → evaluation of its task → export (`export_pruned_model`, atomic) + ``results.json`` (atomic, written last).

The task comes from the checkpoint's architectures or ``task`` (`prune_trainer.tasks`); a token-classification
checkpoint must have CoNLL's 9 labels; the task's evaluation (`TASK_EVALUATORS`) is checked before the data is
read (a task without one runs with ``evaluate=False``)."""

from __future__ import annotations

import inspect
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from prune_trainer.data.conll import Sentence, load_conll_splits
from prune_trainer.data.span_corruption import has_sentinels
from prune_trainer.data.text import load_text, sentences_text, tokenize_text, window_batches
from prune_trainer.devices import device_description, resolve_device
from prune_trainer.io import atomic_write_json
from prune_trainer.llm.models import context_length
from prune_trainer.llm.seq2seq import span_corruption_batches
from prune_trainer.masking.inject import DEFAULT_EXCLUDE, find_target_linears
from prune_trainer.masking.selection import check_sparsity, parse_pattern
from prune_trainer.oneshot.calibration import (
    calibration_batches,
    labelled_calibration_batches,
    next_token_labels,
    prune_sequential,
    wanda_outlier_ratios,
)
from prune_trainer.oneshot.evaluation import check_evaluation, evaluate_task
from prune_trainer.oneshot.owl import owl_sparsities
from prune_trainer.oneshot.registry import get_method
from prune_trainer.oneshot.surgeon import SURGEON_METHODS, SurgeonOptions, surgeon_prune
from prune_trainer.options import Options, unknown_key_error
from prune_trainer.provenance import git_commit
from prune_trainer.structures import STRUCTURE_KINDS
from prune_trainer.tasks import check_task, load_model_for_task, task_of

RESULTS_FILE = "results.json"
SURGEON_TASKS = ("token-classification", "causal-lm")
"""Tasks whose checkpoints LLM Surgeon's methods prune: their own loss on labelled calibration batches gives ``G``."""
OWL_SCOPES = ("linear", "block")
"""Where OWL's outlier ratio ``D_l`` is measured: per target Linear, or per transformer block (Yin et al. 2024)."""


@dataclass
class OneShotConfig(Options):
    """One one-shot setting: the fine-tuned ``model``, the per-layer ``method`` (`ONESHOT_METHODS`), the target
    ``sparsity`` (or an N:M ``pattern``), optional OWL allocation, the calibration sample, evaluation and export.
    ``options``: keyword options of the method's pruner (e.g. ``{"percdamp": 0.01, "lazy": 64}`` for OBS; an
    unknown key is an error naming the pruner's options). ``task``: None (from the checkpoint's architectures) or a
    `TASKS` name; ``targets``/``exclude``: regexes (None: the family preset, `MODEL_FAMILIES`); ``eval_file``: the
    labelled texts (JSON Lines) a sequence-classification model is evaluated on, the text a causal LM's perplexity
    is measured on, or a seq2seq model's (source, target) pairs (JSON Lines; None: T5 span corruption of the
    validation text). Causal LM and seq2seq: ``max_length`` is the calibration and perplexity window (``seqlen``),
    ``calib_text`` a text source (`load_text`: a file, ``conll-train``, ``wikitext2-train``; None: the CoNLL-2003
    training text) the calibration windows are drawn from (seq2seq: span-corrupted); ``eval_windows`` caps the
    causal-LM perplexity windows (evenly spaced; None: the whole text). ``owl_scope``: OWL's outlier ratio per
    target Linear (``linear``) or per transformer block over all its targets (``block``, as Yin et al. 2024; with
    ``owl_m=5``, ``owl_lambda=0.08`` their LLaMA settings).
    For ``llm-surgeon`` / ``k-obd`` / ``structured-obs``, ``options`` are `SurgeonOptions` (e.g. ``{"shots": 5,
    "allocation": "global"}``) and ``structures``: ``["heads", "ffn"]`` (or one of them) prunes those coupled
    structures instead of elements (``sparsity`` is then the fraction of their weights removed; the export is the
    physically smaller model); they prune token-classification checkpoints (``G`` from the CoNLL tags) and causal
    LMs (``G`` from the next-token loss on the calibration windows)."""

    section = "one-shot config"

    model: str
    method: str = "sparsegpt"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    owl: bool = False
    owl_m: float = 1.0
    owl_lambda: float | None = None
    owl_scope: str = "linear"
    calib_samples: int = 4096
    calib_batch_size: int = 32
    seed: int = 0
    pruned_inputs: bool = True
    max_length: int = 128
    eval_batch_size: int = 64
    data_dir: str | None = None
    output_dir: str | None = None
    export: bool = True
    evaluate: bool = True
    options: dict[str, Any] = field(default_factory=dict)
    device: str = "auto"  # "auto" (CUDA when available, as Trainer does), "cpu", "cuda", "cuda:1", ...
    task: str | None = None
    targets: list[str] | None = None
    exclude: list[str] | None = None
    eval_file: str | None = None
    calib_text: str | None = None
    eval_windows: int | None = None
    structures: list[str] = field(default_factory=list)

    def validate(self) -> None:
        nm = parse_pattern(self.pattern)
        if self.method in SURGEON_METHODS:
            self._validate_surgeon(nm)
        else:
            self._validate_layer_method()
        resolve_device(self.device)
        check_task(self.task)
        if nm is None:
            check_sparsity(self.sparsity)
        if self.owl and nm is not None:
            raise ValueError(f"OWL allocates unstructured sparsity; cannot combine it with pattern {self.pattern!r}")
        if self.calib_samples <= 0:
            raise ValueError(f"calib_samples must be positive, got {self.calib_samples}")
        if self.owl_scope not in OWL_SCOPES:
            raise ValueError(f"owl_scope must be one of {list(OWL_SCOPES)}, got {self.owl_scope!r}")
        if self.eval_windows is not None and self.eval_windows <= 0:
            raise ValueError(f"eval_windows must be positive or None, got {self.eval_windows}")

    def _validate_surgeon(self, nm: tuple[int, int] | None) -> None:
        SurgeonOptions.from_dict(self.options)  # unknown keys and bad values name the options
        if set(self.structures) - set(STRUCTURE_KINDS):
            raise ValueError(f"structures must be among {list(STRUCTURE_KINDS)}, got {self.structures}")
        if self.structures and nm is not None:
            raise ValueError(f"structures {self.structures} and pattern {self.pattern!r} exclude each other")
        if self.owl:
            raise ValueError(f"{self.method} allocates sparsity itself (options.allocation); OWL does not apply")
        if self.task not in (None, *SURGEON_TASKS):
            raise ValueError(f"{self.method} needs a model with its own loss on calibration batches "
                             f"({list(SURGEON_TASKS)}); task {self.task!r} is not")

    def _validate_layer_method(self) -> None:
        method = get_method(self.method)
        if self.structures:
            raise ValueError(f"structures {self.structures} need an LLM Surgeon method {list(SURGEON_METHODS)}")
        params = inspect.signature(method.prune).parameters
        allowed = [n for n, p in params.items() if p.kind is p.KEYWORD_ONLY or (
            p.default is not p.empty and n not in ("prunen", "prunem"))]
        unknown = set(self.options) - set(allowed)
        if unknown:
            raise unknown_key_error(f"{self.method} pruner options", unknown, allowed)


def run_oneshot(
    cfg: OneShotConfig,
    splits: dict[str, list[Sentence]] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run one configuration; return (and write to ``<output_dir>/results.json``) its results."""
    from prune_trainer.export import export_pruned_model
    from prune_trainer.models import check_model_labels, load_model_config, resolve_model_path

    cfg.validate()
    model_path = resolve_model_path(cfg.model)  # a missing model directory fails here, before the data is read
    config = load_model_config(model_path)
    task = task_of(config, cfg.task, cfg.model)
    if task == "token-classification":
        check_model_labels(config, cfg.model, require_token_head=True)
    elif cfg.method in SURGEON_METHODS and task not in SURGEON_TASKS:
        raise ValueError(f"{cfg.method} needs a token-classification or causal-LM checkpoint (the model's own loss "
                         f"on labelled calibration batches); got {task}")
    if cfg.evaluate:  # a sequence-classification eval_file is read here against the checkpoint's labels
        check_evaluation(task, cfg, label2id=dict(getattr(config, "label2id", None) or {}))
    splits = splits if splits is not None else load_conll_splits(cfg.data_dir)
    device = resolve_device(cfg.device)
    model, tokenizer, _ = load_model_for_task(model_path, task)
    model.to(device).eval()
    if cfg.evaluate:
        check_evaluation(task, cfg, tokenizer)  # what only the tokenizer tells (seq2seq: sentinels), before pruning
    if cfg.method in SURGEON_METHODS:
        pruned = _prune_surgeon(model, tokenizer, splits, task, cfg, progress)
    else:
        pruned = _prune(model, _calibration(model, tokenizer, splits, task, cfg), cfg, progress)
    results: dict[str, Any] = {"config": asdict(cfg), "task": task, **pruned}
    results.update(torch_threads=torch.get_num_threads(), cpu_count=os.cpu_count(), device=device_description(device),
                   git_commit=git_commit(), command=" ".join(sys.argv))
    if cfg.evaluate:
        results.update(evaluate_task(task, model, tokenizer, splits, cfg))
    if cfg.output_dir:
        out = Path(cfg.output_dir)
        if cfg.export and cfg.structures:  # the physically smaller model
            from prune_trainer.export.structured import export_structured_model

            results["sparsity"] = _measured_sparsity(model, cfg)
            results["structure"] = export_structured_model(model, out / "model", tokenizer)
        elif cfg.export:
            sp = export_pruned_model(model, out / "model", tokenizer, method=cfg.method, pattern=cfg.pattern,
                                     config=asdict(cfg), layer_names=_target_names(model, cfg))
            results["sparsity"] = sp["global_sparsity"]
            results["sparsity_per_layer"] = sp["per_layer"]
        else:
            results["sparsity"] = _measured_sparsity(model, cfg)
        atomic_write_json(out / RESULTS_FILE, results)  # after model/: its presence marks the setting done
    if "sparsity" not in results:
        results["sparsity"] = _measured_sparsity(model, cfg)
    return results


def _calibration(model: torch.nn.Module, tokenizer: Any, splits: dict[str, list[Sentence]], task: str,
                 cfg: OneShotConfig) -> list[dict[str, torch.Tensor]]:
    """Calibration batches: random windows of the training text (``calib_text`` or CoNLL-2003's) for a causal LM
    (SparseGPT's sampling, within the model's context) and, span-corrupted, for a seq2seq model whose tokenizer has
    T5's sentinels; else sentences of the training split (a seq2seq decoder then reads the source shifted right)."""
    if task == "causal-lm":
        seqlen = min(cfg.max_length, context_length(model) or cfg.max_length)
        return window_batches(tokenize_text(_calib_text(splits, cfg), tokenizer), cfg.calib_samples,
                              cfg.calib_batch_size, seqlen, cfg.seed)
    if task == "seq2seq" and has_sentinels(tokenizer):
        return span_corruption_batches(model, tokenizer, tokenize_text(_calib_text(splits, cfg), tokenizer),
                                       cfg.calib_samples, cfg.calib_batch_size, cfg.max_length, cfg.seed)
    return calibration_batches(splits["train"], tokenizer, cfg.calib_samples, cfg.calib_batch_size,
                               cfg.max_length, cfg.seed, split_words=task == "token-classification")


def _calib_text(splits: dict[str, list[Sentence]], cfg: OneShotConfig) -> str:
    """The text calibration windows are drawn from: ``cfg.calib_text`` (`load_text`), else the CoNLL-2003 train
    split."""
    return load_text(cfg.calib_text, cfg.data_dir) if cfg.calib_text else sentences_text(splits["train"])


def _prune_surgeon(
    model: torch.nn.Module, tokenizer: Any, splits: dict[str, list[Sentence]], task: str, cfg: OneShotConfig,
    progress: bool,
) -> dict[str, Any]:
    """LLM Surgeon and its baselines (`surgeon_prune`) from labelled calibration batches: CoNLL sentences with
    their tags (token classification), or the causal-LM calibration windows with their next tokens."""
    nm = parse_pattern(cfg.pattern)
    prunen, prunem = nm if nm else (0, 0)
    start = time.perf_counter()
    if task == "causal-lm":
        batches = next_token_labels(_calibration(model, tokenizer, splits, task, cfg))
    else:
        batches = labelled_calibration_batches(
            splits["train"], tokenizer, cfg.calib_samples, cfg.calib_batch_size, cfg.max_length, cfg.seed
        )
    opts = SurgeonOptions.from_dict(cfg.options)
    report = surgeon_prune(model, batches, cfg.method, cfg.sparsity, _target_names(model, cfg), prunen, prunem,
                           cfg.structures or None, opts, progress)
    return {
        "prune_time_s": round(time.perf_counter() - start, 2), "solve_time_s": round(report.solve_time_s, 2),
        "curvature_time_s": round(report.curvature_time_s, 2), "calib_tokens": report.n_tokens, "owl": None,
        "surgeon": {
            "options": opts.to_dict(), "kfac_factor_mib": round(report.factor_mib, 2), "passes": report.passes,
            "cg_iterations": report.cg_iterations, "removed_groups": report.removed_groups,
            "layer_sparsity": report.layer_sparsity,
        },
    }


def _prune(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], cfg: OneShotConfig,
           progress: bool) -> dict[str, Any]:
    """(OWL allocation and) sequential pruning; the timings, calibration token count and OWL details."""
    nm = parse_pattern(cfg.pattern)
    prunen, prunem = nm if nm else (0, 0)
    targets, exclude = cfg.targets, DEFAULT_EXCLUDE if cfg.exclude is None else cfg.exclude
    start = time.perf_counter()
    sparsity: float | dict[str, float] = cfg.sparsity if nm is None else 1.0 - prunen / prunem
    owl_info = None
    if cfg.owl:
        ratios = wanda_outlier_ratios(model, batches, cfg.owl_m, targets, exclude,
                                      per_block=cfg.owl_scope == "block")
        sizes = {n: model.get_submodule(n).weight.numel() for n in _target_names(model, cfg)}
        sparsity = owl_sparsities(ratios, sizes, cfg.sparsity, cfg.owl_lambda)
        owl_info = {"m": cfg.owl_m, "lambda": cfg.owl_lambda, "scope": cfg.owl_scope, "outlier_ratios": ratios,
                    "layer_sparsity": sparsity}
    report = prune_sequential(
        model, batches, get_method(cfg.method), sparsity, prunen, prunem, cfg.pruned_inputs,
        targets, exclude, progress, **cfg.options,
    )
    return {"prune_time_s": round(time.perf_counter() - start, 2), "solve_time_s": round(report.solve_time_s, 2),
            "calib_tokens": report.n_tokens, "owl": owl_info}


def _target_names(model: torch.nn.Module, cfg: OneShotConfig) -> list[str]:
    return find_target_linears(model, cfg.targets, DEFAULT_EXCLUDE if cfg.exclude is None else cfg.exclude)


def _measured_sparsity(model: torch.nn.Module, cfg: OneShotConfig) -> float:
    from prune_trainer.masking.sparsity import weight_sparsity_report

    return float(weight_sparsity_report(model, _target_names(model, cfg))["global_sparsity"])
