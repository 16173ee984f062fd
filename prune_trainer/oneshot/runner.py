"""The one-shot job: load a fine-tuned model → (OWL allocation) → sequential calibration + pruning →
validation F1 → export (`export_pruned_model`, atomic) + ``results.json`` (atomic, written last).

The model must be a token-classification checkpoint with CoNLL's 9 labels (checked before the data is read)."""

from __future__ import annotations

import inspect
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from prune_trainer.data.conll import Sentence, load_conll_splits
from prune_trainer.devices import device_description, resolve_device
from prune_trainer.io import atomic_write_json
from prune_trainer.masking.inject import DEFAULT_EXCLUDE, DEFAULT_TARGETS, find_target_linears
from prune_trainer.masking.selection import check_sparsity, parse_pattern
from prune_trainer.oneshot.calibration import (
    calibration_batches,
    labelled_calibration_batches,
    prune_sequential,
    wanda_outlier_ratios,
)
from prune_trainer.oneshot.evaluation import evaluate_f1
from prune_trainer.oneshot.owl import owl_sparsities
from prune_trainer.oneshot.registry import get_method
from prune_trainer.oneshot.surgeon import SURGEON_METHODS, SurgeonOptions, surgeon_prune
from prune_trainer.options import Options, unknown_key_error
from prune_trainer.structures import STRUCTURE_KINDS

RESULTS_FILE = "results.json"


@dataclass
class OneShotConfig(Options):
    """One one-shot setting: the fine-tuned ``model``, the per-layer ``method`` (`ONESHOT_METHODS`), the target
    ``sparsity`` (or an N:M ``pattern``), optional OWL allocation, the calibration sample, evaluation and export.
    ``options``: keyword options of the method's pruner (e.g. ``{"percdamp": 0.01, "lazy": 64}`` for OBS; an
    unknown key is an error naming the pruner's options), or `SurgeonOptions` for ``llm-surgeon`` / ``k-obd`` /
    ``structured-obs`` (e.g. ``{"shots": 5, "allocation": "global"}``). ``structures``: ``["heads", "ffn"]`` (or
    one of them) prunes those coupled structures instead of elements (LLM Surgeon methods only; ``sparsity`` is then
    the fraction of their weights removed, and the export is the physically smaller model)."""

    section = "one-shot config"

    model: str
    method: str = "sparsegpt"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    owl: bool = False
    owl_m: float = 1.0
    owl_lambda: float | None = None
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
    structures: list[str] = field(default_factory=list)
    device: str = "auto"  # "auto" (CUDA when available, as Trainer does), "cpu", "cuda", "cuda:1", ...

    def validate(self) -> None:
        nm = parse_pattern(self.pattern)
        if self.method in SURGEON_METHODS:
            SurgeonOptions.from_dict(self.options)  # unknown keys and bad values name the options
            unknown = set(self.structures) - set(STRUCTURE_KINDS)
            if unknown:
                raise ValueError(f"structures must be among {list(STRUCTURE_KINDS)}, got {self.structures}")
            if self.structures and nm is not None:
                raise ValueError(f"structures {self.structures} and pattern {self.pattern!r} exclude each other")
            if self.owl:
                raise ValueError(f"{self.method} allocates sparsity itself (options.allocation); OWL does not apply")
        else:
            self._validate_layer_method()
        resolve_device(self.device)
        if nm is None:
            check_sparsity(self.sparsity)
        if self.owl and nm is not None:
            raise ValueError(f"OWL allocates unstructured sparsity; cannot combine it with pattern {self.pattern!r}")
        if self.calib_samples <= 0:
            raise ValueError(f"calib_samples must be positive, got {self.calib_samples}")

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
    from prune_trainer.models import check_model_labels, load_model_and_tokenizer, load_model_config, resolve_model_path

    cfg.validate()
    model_path = resolve_model_path(cfg.model)  # a missing model directory fails here, before the data is read
    check_model_labels(load_model_config(model_path), cfg.model, require_token_head=True)
    splits = splits if splits is not None else load_conll_splits(cfg.data_dir)
    device = resolve_device(cfg.device)
    model, tokenizer = load_model_and_tokenizer(model_path)
    model.to(device).eval()
    start = time.perf_counter()
    if cfg.method in SURGEON_METHODS:
        extra = _prune_surgeon(model, tokenizer, splits, cfg, progress)
    else:
        extra = _prune_layerwise(model, tokenizer, splits, cfg, progress)
    results: dict[str, Any] = {
        "config": asdict(cfg),
        "prune_time_s": round(time.perf_counter() - start, 2),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": device_description(device),
        **extra,
    }
    if cfg.evaluate:
        results.update(_evaluate(model, tokenizer, splits, cfg))
    if cfg.structures:
        results["sparsity"] = _measured_sparsity(model)
    if cfg.output_dir:
        out = Path(cfg.output_dir)
        if cfg.export:
            results.update(_export(model, tokenizer, out / "model", cfg))
        atomic_write_json(out / RESULTS_FILE, results)  # after model/: its presence marks the setting done
    if "sparsity" not in results:
        results["sparsity"] = _measured_sparsity(model)
    return results


def _prune_layerwise(
    model: torch.nn.Module, tokenizer: Any, splits: dict[str, list[Sentence]], cfg: OneShotConfig, progress: bool
) -> dict[str, Any]:
    """The per-layer methods (`ONESHOT_METHODS`): sequential calibration, optionally OWL allocation."""
    method = get_method(cfg.method)
    nm = parse_pattern(cfg.pattern)
    prunen, prunem = nm if nm else (0, 0)
    batches = calibration_batches(
        splits["train"], tokenizer, cfg.calib_samples, cfg.calib_batch_size, cfg.max_length, cfg.seed
    )
    sparsity: float | dict[str, float] = cfg.sparsity if nm is None else 1.0 - prunen / prunem
    owl_info = None
    if cfg.owl:
        ratios = wanda_outlier_ratios(model, batches, cfg.owl_m)
        sizes = {n: model.get_submodule(n).weight.numel() for n in find_target_linears(model)}
        sparsity = owl_sparsities(ratios, sizes, cfg.sparsity, cfg.owl_lambda)
        owl_info = {"outlier_ratios": ratios, "layer_sparsity": sparsity}
    report = prune_sequential(
        model, batches, method, sparsity, prunen, prunem, cfg.pruned_inputs,
        DEFAULT_TARGETS, DEFAULT_EXCLUDE, progress, **cfg.options,
    )
    return {"solve_time_s": round(report.solve_time_s, 2), "calib_tokens": report.n_tokens, "owl": owl_info}


def _prune_surgeon(
    model: torch.nn.Module, tokenizer: Any, splits: dict[str, list[Sentence]], cfg: OneShotConfig, progress: bool
) -> dict[str, Any]:
    """LLM Surgeon and its baselines (`surgeon_prune`) from labelled calibration batches."""
    nm = parse_pattern(cfg.pattern)
    prunen, prunem = nm if nm else (0, 0)
    batches = labelled_calibration_batches(
        splits["train"], tokenizer, cfg.calib_samples, cfg.calib_batch_size, cfg.max_length, cfg.seed
    )
    names = find_target_linears(model, DEFAULT_TARGETS, DEFAULT_EXCLUDE)
    opts = SurgeonOptions.from_dict(cfg.options)
    report = surgeon_prune(model, batches, cfg.method, cfg.sparsity, names, prunen, prunem,
                           cfg.structures or None, opts, progress)
    return {
        "solve_time_s": round(report.solve_time_s, 2), "curvature_time_s": round(report.curvature_time_s, 2),
        "calib_tokens": report.n_tokens, "owl": None, "surgeon": {
            "options": opts.to_dict(), "kfac_factor_mib": round(report.factor_mib, 2), "passes": report.passes,
            "cg_iterations": report.cg_iterations, "removed_groups": report.removed_groups,
            "layer_sparsity": report.layer_sparsity,
        },
    }


def _export(model: torch.nn.Module, tokenizer: Any, path: Path, cfg: OneShotConfig) -> dict[str, Any]:
    """Unstructured / N:M: `export_pruned_model` (sparsity report); structures: `export_structured_model`, the
    physically smaller model (kept sizes per layer)."""
    from prune_trainer.export import export_pruned_model
    from prune_trainer.export.structured import export_structured_model

    if cfg.structures:
        return {"structure": export_structured_model(model, path, tokenizer)}
    sp = export_pruned_model(model, path, tokenizer, method=cfg.method, pattern=cfg.pattern, config=asdict(cfg))
    return {"sparsity": sp["global_sparsity"], "sparsity_per_layer": sp["per_layer"]}


def _evaluate(model: torch.nn.Module, tokenizer: Any, splits: dict[str, list[Sentence]], cfg: OneShotConfig) -> dict:
    """Entity F1 on the validation split (and on the test split when the data has one), with timings."""
    t0 = time.perf_counter()
    scores = evaluate_f1(model, tokenizer, splits["validation"], cfg.eval_batch_size, cfg.max_length)
    out: dict[str, Any] = {f"eval_{k}": v for k, v in scores.items()}
    out["eval_time_s"] = round(time.perf_counter() - t0, 1)
    out["eval_sentences"] = len(splits["validation"])
    if "test" in splits:  # every split the data has (CoNLL-2003's test.txt when present)
        scores = evaluate_f1(model, tokenizer, splits["test"], cfg.eval_batch_size, cfg.max_length)
        out.update({f"test_{k}": v for k, v in scores.items()})
        out["test_sentences"] = len(splits["test"])
    return out


def _measured_sparsity(model: torch.nn.Module) -> float:
    from prune_trainer.masking.sparsity import weight_sparsity_report

    return float(weight_sparsity_report(model)["global_sparsity"])
