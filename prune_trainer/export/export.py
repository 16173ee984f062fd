"""Export a pruned model as a plain HF checkpoint (zeros baked in) plus ``sparsity.json``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from prune_trainer.io import atomic_dir
from prune_trainer.masking.inject import masked_layers, unwrap_masked_layers
from prune_trainer.masking.sparsity import weight_sparsity_report

SPARSITY_FILE = "sparsity.json"
WEIGHT_FILES = (
    "model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json",
)
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer.model", "vocab.json", "spiece.model")


def has_model_weights(path: str | os.PathLike) -> bool:
    """True when ``path`` holds a `save_pretrained` weights file (safetensors or bin, single or sharded)."""
    return any((Path(path) / name).is_file() for name in WEIGHT_FILES)


def is_complete_model_dir(path: str | os.PathLike, exported: bool = True) -> bool:
    """A model folder that loads: ``config.json`` + weights + tokenizer files, and (``exported``: written by
    `export_pruned_model`) a ``sparsity.json`` that parses."""
    path = Path(path)
    if not ((path / "config.json").is_file() and has_model_weights(path)):
        return False
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return False
    if exported:
        try:
            json.loads((path / SPARSITY_FILE).read_text())
        except (OSError, ValueError):
            return False
    return True


def sparsity_report(
    model: nn.Module,
    layer_names: list[str] | None = None,
    method: str | None = None,
    pattern: str = "unstructured",
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Global and per-layer zero fraction of the pruned Linear weights, with method/pattern/config."""
    report = weight_sparsity_report(model, layer_names)
    return {
        "global_sparsity": report["global_sparsity"],
        "num_zeros": report["num_zeros"],
        "num_weights": report["num_weights"],
        "per_layer": report["layers"],
        "pattern": pattern,
        "method": method,
        "config": config or {},
    }


def export_pruned_model(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: Any = None,
    method: str | None = None,
    pattern: str = "unstructured",
    config: dict[str, Any] | None = None,
    layer_names: list[str] | None = None,
) -> dict[str, Any]:
    """Unwrap ``model`` in place (``MaskedLinear`` → ``nn.Linear`` with ``W ⊙ M``), `save_pretrained`
    it (and the tokenizer) to ``path``, and write ``sparsity.json``; return that report.

    The folder is built in a temporary sibling and renamed into place (`atomic_dir`): ``path`` is complete or
    absent, never half-written, even when the process is killed. The directory reloads with
    ``from_pretrained`` of the model's own class (GPT-2's `Conv1D` layers come back as `Conv1D`). The report covers
    ``layer_names`` (default: the wrapped layers, else the family's default targets).
    """
    path = Path(path)
    layer_names = layer_names or list(masked_layers(model)) or None
    unwrap_masked_layers(model)
    report = sparsity_report(model, layer_names, method=method, pattern=pattern, config=config)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / SPARSITY_FILE).write_text(json.dumps(report, indent=2))
    return report
