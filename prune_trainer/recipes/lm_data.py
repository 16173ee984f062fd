"""Causal-LM recipes (``task: causal-lm``): the model, the training blocks, the evaluation windows and the final
perplexity of the trained model.

Training set: the tokenised ``data.train_text`` cut into consecutive non-overlapping blocks of ``data.max_length``
tokens (the incomplete tail dropped), ``labels = input_ids``: Hugging Face's ``run_clm`` ``group_texts``; the
model shifts the labels itself, so the loss is the mean next-token NLL. The Trainer shuffles the blocks.

Evaluation: the non-overlapping ``max_length``-token windows of ``data.eval_text`` (at most ``max_eval_samples``,
evenly spaced), the windows `prune_trainer.llm.perplexity.perplexity` scores. The Trainer logs their ``eval_loss``
while training; the final ``eval_perplexity = exp(Σ NLL / T)`` is `perplexity` of the trained model, the protocol
of the one-shot results (SparseGPT / Wanda, Frantar & Alistarh 2023, §5; Sun et al. 2024, §5).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from prune_trainer.data.text import CONLL_TEXT_SOURCES, WIKITEXT_SOURCES
from prune_trainer.llm.perplexity import evenly_spaced, perplexity_metrics, perplexity_windows
from prune_trainer.recipes.recipe import DataOptions, Recipe


class BlockDataset(Dataset):
    """Rows of a ``(n, length)`` id tensor as causal-LM examples: ``input_ids``, an all-ones ``attention_mask``
    and ``labels = input_ids``."""

    def __init__(self, blocks: torch.Tensor) -> None:
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.blocks[i]
        return {"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row}


@dataclass
class LmData:
    """A causal-LM run's data: training blocks, evaluation windows (as a dataset and as the token sequence
    `perplexity` scores) and the model's original ``use_cache`` (off while training, restored for the export)."""

    train_ds: BlockDataset
    eval_ds: BlockDataset
    eval_ids: torch.Tensor
    seqlen: int
    max_windows: int | None
    use_cache: Any


def check_text_sources(data: DataOptions, where: str) -> None:
    """A text source that is a file must exist (checked before the model loads; CoNLL and WikiText sources are
    checked when they are read, still before anything is written)."""
    for key in ("train_text", "eval_text"):
        source = getattr(data, key)
        if source in CONLL_TEXT_SOURCES or source in WIKITEXT_SOURCES:
            continue
        if not Path(source).expanduser().is_file():
            known = [*CONLL_TEXT_SOURCES, *WIKITEXT_SOURCES]
            raise FileNotFoundError(f"{where}: data.{key} {source!r} is neither a file nor one of {known}")


def train_blocks(ids: torch.Tensor, length: int, max_blocks: int | None = None) -> torch.Tensor:
    """``(n, length)``: the consecutive non-overlapping ``length``-token blocks of ``ids`` (tail dropped), the first
    ``max_blocks`` of them when given (``run_clm``'s ``group_texts``)."""
    n = ids.numel() // length
    if n == 0:
        raise ValueError(f"the training text has {ids.numel()} tokens, fewer than one block of max_length={length}")
    n = n if max_blocks is None else min(n, max_blocks)
    return ids[: n * length].view(n, length)


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """``(k, seqlen)``: the windows `perplexity` scores with ``stride=None`` and ``max_windows``."""
    windows = evenly_spaced(perplexity_windows(ids.numel(), seqlen), max_windows)
    return torch.stack([ids[w.begin : w.end] for w in windows])


def resolve_lm_source(recipe: Recipe) -> str:
    """The causal LM the run starts from (``init_from`` over ``model``, default ``embedded-llm``), checked where
    `load_causal_lm` will load it (`causal_lm_location`): a ``.gguf`` file (returned as given), else the model
    directory or hub id `resolve_model_path` gives."""
    from prune_trainer.llm.models import EMBEDDED_LLM, causal_lm_location

    name = recipe.init_from or recipe.model or EMBEDDED_LLM
    try:
        path, gguf = causal_lm_location(name)
    except FileNotFoundError as err:
        if Path(name).suffix != ".gguf":
            raise
        raise FileNotFoundError(f"{recipe.source}: {err}") from err
    return name if gguf else path


def load_lm_task(recipe: Recipe, model_src: str) -> tuple[Any, Any, LmData]:
    """Model (``use_cache`` off), tokenizer and `LmData` of a causal-LM recipe; raises before anything is written
    on a missing text, a ``max_length`` above the model's context or a text shorter than one block."""
    from prune_trainer.data.text import load_text, tokenize_text
    from prune_trainer.llm.models import context_length, load_causal_lm

    data = recipe.data
    check_text_sources(data, recipe.source)
    model, tokenizer = load_causal_lm(model_src)
    context = context_length(model)
    if context is not None and data.max_length > context:
        raise ValueError(f"{recipe.source}: data.max_length={data.max_length} is above the model's context of "
                         f"{context} tokens ({model_src})")
    train_ids = tokenize_text(load_text(data.train_text, data.data_dir), tokenizer)
    eval_ids = tokenize_text(load_text(data.eval_text, data.data_dir), tokenizer)
    train = train_blocks(train_ids, data.max_length, data.max_train_samples)
    evaluation = eval_windows(eval_ids, data.max_length, data.max_eval_samples)
    use_cache = getattr(model.config, "use_cache", None)
    model.config.use_cache = False  # no key/value cache while training (HF's run_clm does the same)
    model.train()
    lm = LmData(BlockDataset(train), BlockDataset(evaluation), eval_ids, data.max_length, data.max_eval_samples,
                use_cache)
    return model, tokenizer, lm


def lm_trainer_kwargs(lm: LmData) -> dict[str, Any]:
    """The Trainer's task arguments: the evaluation windows (``eval_loss`` only) and a collator that stacks the
    equal-length blocks."""
    from transformers import default_data_collator

    return {"eval_dataset": lm.eval_ds, "data_collator": default_data_collator}


def evaluate_lm(model: Any, lm: LmData, eval_batch_size: int) -> dict[str, Any]:
    """Perplexity of the trained model on the evaluation windows (`perplexity_metrics`); then restores the model's
    ``use_cache`` for the export."""
    metrics = perplexity_metrics(model, lm.eval_ids, lm.seqlen, eval_batch_size, lm.max_windows)
    if lm.use_cache is not None:
        model.config.use_cache = lm.use_cache
    return metrics
