"""Re-export a saved model folder (plain, structured or compressed) in another storage format: the command
``prune-trainer export`` and the benchmarks use it."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prune_trainer.export.export import SPARSITY_FILE, TOKENIZER_FILES, export_pruned_model


def weight_file_mib(path: str | os.PathLike) -> float:
    """MiB of a model folder's weight files (``*.safetensors``, ``*.bin``) and of an ``.onnx`` file."""
    path = Path(path)
    files = [path] if path.is_file() else [f for f in path.iterdir() if f.suffix in (".safetensors", ".bin")]
    return sum(f.stat().st_size for f in files) / 2**20


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    format: str = "bitmask",
    quantize: str | None = None,
    pattern: str | None = None,
    embedding_rank: int | None = None,
    embedding_rows: Sequence[int] | None = None,
    embedding_quant: str | None = None,
) -> dict[str, Any]:
    """Load ``src`` with `load_pruned_model` (no pickle, no code), write it to ``dst`` with `export_pruned_model`
    and these storage settings (N:M ``pattern``: given, else the source's ``sparsity.json`` pattern when it is N:M,
    else 2:4), with the source's tokenizer and method. Returns the new ``sparsity.json`` report with ``src_mib``
    and ``dst_mib`` (weight files)."""
    from transformers import AutoTokenizer

    from prune_trainer.export.structured import load_pruned_model

    src, dst = Path(src), Path(dst)
    if src.resolve() == dst.resolve():
        raise ValueError(f"export: the output folder {dst} is the source folder; choose another")
    source_report: dict[str, Any] = {}
    if (src / SPARSITY_FILE).is_file():
        source_report = json.loads((src / SPARSITY_FILE).read_text())
    if pattern is None:
        pattern = source_report.get("pattern", "unstructured")
    model = load_pruned_model(src)
    has_tokenizer = any((src / name).is_file() for name in TOKENIZER_FILES)
    tokenizer = AutoTokenizer.from_pretrained(src) if has_tokenizer else None
    report = export_pruned_model(model, dst, tokenizer, method=source_report.get("method"), pattern=pattern,
                                 config=source_report.get("config"), format=format, quantize=quantize,
                                 embedding_rank=embedding_rank, embedding_rows=embedding_rows,
                                 embedding_quant=embedding_quant)
    return {**report, "src_mib": round(weight_file_mib(src), 3), "dst_mib": round(weight_file_mib(dst), 3)}
