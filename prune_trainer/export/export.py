"""Export a pruned model as a plain HF checkpoint (zeros baked in) plus ``sparsity.json``."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prune_trainer.export.compressed import CompressionSpec, encode_model, write_compressed
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


def canonicalize_zeros(model: nn.Module) -> None:
    """Turn every ``-0.0`` of the Linear weights into ``+0.0`` in place (``W ⊙ M`` gives ``-0.0`` where ``W < 0``),
    so that every export format rebuilds the same bits."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear) and module.weight.is_floating_point():
                module.weight.add_(0.0)


def encode_for_export(model: nn.Module, spec: CompressionSpec) -> tuple[dict, dict] | None:
    """The encoded tensors and layout of a non-plain ``spec`` (None for a plain checkpoint); raises before any
    file is written (e.g. a layer that is not N:M)."""
    return None if spec.plain else encode_model(model, spec)


def save_model_weights(model: nn.Module, folder: Path, encoded: tuple[dict, dict] | None) -> None:
    """``save_pretrained`` (plain) or ``config.json`` + the compressed safetensors and ``compression.json``."""
    if encoded is None:
        model.save_pretrained(folder)
    else:
        model.config.architectures = [type(model).__name__]  # as save_pretrained records it
        model.config.save_pretrained(folder)
        write_compressed(*encoded, folder)


def export_pruned_model(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: Any = None,
    method: str | None = None,
    pattern: str = "unstructured",
    config: dict[str, Any] | None = None,
    layer_names: list[str] | None = None,
    format: str = "dense",
    quantize: str | None = None,
    embedding_rank: int | None = None,
    embedding_rows: Sequence[int] | None = None,
    embedding_quant: str | None = None,
) -> dict[str, Any]:
    """Unwrap ``model`` in place (``MaskedLinear`` → ``nn.Linear`` with ``W ⊙ M``), save it (and the tokenizer)
    to ``path``, and write ``sparsity.json``; return that report.

    ``format="dense"`` without ``quantize``: a plain `save_pretrained` folder (reloads with ``from_pretrained`` of
    the model's own class; GPT-2's `Conv1D` layers come back as `Conv1D`). ``format="bitmask" | "nm"`` and/or
    ``quantize="int8"`` and/or ``embedding_rank`` (word embeddings as rank-r factors) or ``embedding_rows`` (keep
    only these vocabulary
    rows, e.g. `used_token_ids` of the training data; the others load as the tokenizer's unknown token): a
    compressed checkpoint (`prune_trainer.export.compressed`; ``nm`` takes N:M from ``pattern``, default 2:4) that
    `load_pruned_model` rebuilds. ``embedding_quant`` ("int8" | "int4", default: ``quantize``) quantizes the word
    embeddings alone (INT4: groups of 128 values of a row, fp16 scales). Bad settings and layers that are not N:M raise
    before anything is written. The folder is built in a temporary sibling and renamed into place
    (`atomic_dir`): ``path`` is complete or absent, never half-written, even when the process is killed.
    The report covers ``layer_names`` (default: the wrapped layers, else the family's default targets).
    """
    nm_pattern = pattern if ":" in str(pattern) else "2:4"
    fill = getattr(tokenizer, "unk_token_id", None)
    if embedding_rows is not None and fill is None:
        raise ValueError("embedding_rows needs a tokenizer with an unknown token: it fills the dropped rows")
    spec = CompressionSpec(format=format, quantize=quantize, pattern=nm_pattern, embedding_rank=embedding_rank,
                           embedding_rows=None if embedding_rows is None else tuple(sorted({fill, *embedding_rows})),
                           embedding_fill=None if embedding_rows is None else fill, embedding_quant=embedding_quant)
    path = Path(path)
    layer_names = layer_names or list(masked_layers(model)) or None
    unwrap_masked_layers(model)
    canonicalize_zeros(model)
    report = sparsity_report(model, layer_names, method=method, pattern=pattern, config=config)
    encoded = encode_for_export(model, spec)
    if encoded is not None:
        report["compression"] = {k: encoded[1][k] for k in ("format", "quantize", "pattern", "embedding_rank",
                                                             "embedding_quant")}
        report["compression"]["embedding_rows"] = None if embedding_rows is None else len(spec.embedding_rows)
    with atomic_dir(path) as tmp:
        save_model_weights(model, tmp, encoded)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / SPARSITY_FILE).write_text(json.dumps(report, indent=2))
    return report
