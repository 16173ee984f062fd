"""Supported model families: where each one keeps its transformer blocks, hence its default pruning targets.

The only table is `MODEL_FAMILIES`, keyed by ``config.model_type``. A family names the block lists of its base
model in forward order (``encoder.layer``; T5: ``encoder.block`` then ``decoder.block``); a head's wrapper
prefixes them (``bert.encoder.layer``, ``model.layers``), so a block list is matched by its name's suffix. The
default targets of a family are every Linear (GPT-2: every ``Conv1D``) inside those blocks, minus its
``exclude`` patterns; embeddings, poolers, classifier and LM heads sit outside the blocks and are never targets.
The one-shot calibration runner walks the same block lists (`prune_trainer.oneshot.calibration`).

An unknown ``model_type`` needs explicit ``targets`` regexes; the error lists the model's Linear names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ModelFamily:
    """One architecture family.

    ``name``: for messages and docs. ``blocks``: suffixes of the ``nn.ModuleList`` of blocks, in forward order
    (one per stack: an encoder-decoder has two). ``exclude``: regexes of Linears inside the blocks that are not
    pruned by default.
    """

    name: str
    blocks: tuple[str, ...]
    exclude: tuple[str, ...] = ()

    @property
    def targets(self) -> tuple[str, ...]:
        """Regexes matching every module inside one of the blocks (``(^|.)encoder.layer.<i>.``)."""
        return tuple(rf"(^|\.){re.escape(b)}\.\d+\." for b in self.blocks)


_BERT = ModelFamily("BERT", ("encoder.layer",))
_ROBERTA = ModelFamily("RoBERTa", ("encoder.layer",))
_DECODER = ModelFamily("Llama-style decoder", ("layers",))

MODEL_FAMILIES: dict[str, ModelFamily] = {
    "bert": _BERT,
    "roberta": _ROBERTA,
    "xlm-roberta": _ROBERTA,
    "distilbert": ModelFamily("DistilBERT", ("transformer.layer",)),
    # The relative-position projections act on the shared position embeddings, not on tokens: left dense.
    "deberta-v2": ModelFamily("DeBERTa-v2/v3", ("encoder.layer",), (r"pos_key_proj", r"pos_query_proj")),
    "modernbert": ModelFamily("ModernBERT", ("layers",)),
    "llama": _DECODER,
    "qwen2": _DECODER,
    "mistral": _DECODER,
    "gemma": _DECODER,
    "gemma2": _DECODER,
    "qwen3": _DECODER,
    "opt": ModelFamily("OPT", ("decoder.layers",)),
    "gpt2": ModelFamily("GPT-2 (Conv1D)", ("h",)),
    "t5": ModelFamily("T5", ("encoder.block", "decoder.block")),
}
"""``config.model_type`` → its `ModelFamily` (the one table to extend for a new family; add a test config too)."""


def model_type_of(model: nn.Module) -> str | None:
    """``model.config.model_type`` (None for a model without a Hugging Face config)."""
    return getattr(getattr(model, "config", None), "model_type", None)


def family_of(model: nn.Module) -> ModelFamily | None:
    """The model's `ModelFamily`, or None when its ``model_type`` is not in `MODEL_FAMILIES`."""
    return MODEL_FAMILIES.get(model_type_of(model) or "")


def prunable_module_types() -> tuple[type[nn.Module], ...]:
    """Module classes a target can be: `nn.Linear` and transformers' `Conv1D` (GPT-2's transposed Linear)."""
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def unknown_family_error(model: nn.Module) -> ValueError:
    """The error for a model without a family preset: names its type and lists its Linear modules."""
    kinds = prunable_module_types()
    names = [n for n, m in model.named_modules() if isinstance(m, kinds)]
    shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
    return ValueError(
        f"no default pruning targets for model_type {model_type_of(model)!r} ({type(model).__name__}); "
        f"supported families: {sorted(MODEL_FAMILIES)}. Give targets as regexes over these Linear names: "
        f"[{shown}]"
    )
