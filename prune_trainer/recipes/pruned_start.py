"""Runs that start from a pruned export: checks before anything is written, and the export's size report.

A recipe whose ``model`` / ``init_from`` is a structured export (`export_structured_model`: per-layer head counts
and FFN widths in ``config.json``) trains the sliced model as it is (`prune_trainer.models.load_model_and_tokenizer`
builds it with `load_pruned_model`). With ``pruning: null`` its structure stays fixed: the export is the trained
sliced model, and its sparsity is measured against the start model (`fixed_structure_report`). With a group
method (``structured``, ``structured_movement``) more heads / neurons are removed on top, unless a layer of the
start model has lost a whole sublayer: those layers have no groups to score (`check_pruned_start`). A compressed
export (``compression.json``) is refused as a start model: its weights decode to float, so the fine-tuned model
would not keep its compression.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from prune_trainer.models import pruned_export_kind


def recorded_structure(model_dir: str | Path) -> dict[str, Any]:
    """The ``prune_trainer_structure`` field of an export's ``config.json`` (``{}`` when absent)."""
    from prune_trainer.export.structured import STRUCTURE_FIELD

    config = json.loads((Path(model_dir) / "config.json").read_text())
    recorded = config.get(STRUCTURE_FIELD)
    return recorded if isinstance(recorded, dict) else {}


def check_pruned_start(model_src: str, pruning_cfg: Any) -> str | None:
    """The start model's export kind (`pruned_export_kind`), after refusing what cannot be fine-tuned from it.

    Raises:
        ValueError: a compressed export, or a group-pruning method on a structured export with a removed sublayer.
    """
    kind = pruned_export_kind(model_src)
    if kind == "compressed":
        raise ValueError(
            f"model {model_src!r} is a compressed export (compression.json): fine-tuning decodes its weights to "
            "float and the result would not keep the compression. Start from the uncompressed export "
            "(format dense, no quantize) and compress the fine-tuned model afterwards"
        )
    if kind != "structured" or pruning_cfg is None:
        return kind
    from prune_trainer.callbacks.registry import pruning_callback_class
    from prune_trainer.callbacks.structured import GroupPruningCallback

    sizes = recorded_structure(model_src)
    emptied = {k: [i for i, n in enumerate(sizes.get(k, [])) if int(n) == 0] for k in ("heads", "ffn")}
    if issubclass(pruning_callback_class(pruning_cfg.method), GroupPruningCallback) and any(emptied.values()):
        where = ", ".join(f"{k} of layers {v}" for k, v in emptied.items() if v)
        raise ValueError(
            f"pruning.method {pruning_cfg.method!r} cannot prune further on top of {model_src!r}: its export "
            f"removed whole sublayers ({where}), which have no heads / FFN neurons left to score. Fine-tune it "
            "with pruning: null (fixed structure), or prune the dense model with a larger target instead"
        )
    return kind


def layer_linear_counts(model: nn.Module) -> dict[str, int]:
    """Weights of every ``nn.Linear`` inside the transformer layers (the coupled Linears of heads and FFN
    neurons) by qualified name; Linears of a removed sublayer are absent."""
    from prune_trainer.structures import architecture_of

    _, arch = architecture_of(model)
    inside = ("." + arch.layers + ".", arch.layers + ".")
    return {
        name: module.weight.numel()
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and (inside[0] in name or name.startswith(inside[1]))
    }


def fixed_structure_report(start_counts: dict[str, int], start_params: int, model_dir: Path) -> dict[str, Any]:
    """Reload the export (`load_pruned_model`) and measure it against the start model: ``global_sparsity`` is
    ``1 − Σ kept / Σ start`` over the start model's layer Linears (``per_layer`` the same per Linear), ``structure``
    the per-layer sizes recorded in its ``config.json``, ``params`` / ``start_params`` the parameter counts and
    ``model_mib`` the weight file's size."""
    from prune_trainer.bench import weights_mib
    from prune_trainer.export.structured import load_pruned_model
    from prune_trainer.export.sublayers import linear_weight_count

    exported = load_pruned_model(model_dir)
    kept = {n: linear_weight_count(exported, n) for n in start_counts}
    recorded = recorded_structure(model_dir)
    return {
        "global_sparsity": 1.0 - sum(kept.values()) / sum(start_counts.values()),
        "per_layer": {n: 1.0 - kept[n] / start_counts[n] for n in start_counts},
        "structure": {k: recorded[k] for k in ("heads", "ffn") if k in recorded},
        "params": sum(p.numel() for p in exported.parameters()),
        "start_params": start_params,
        "model_mib": weights_mib(model_dir),
    }
