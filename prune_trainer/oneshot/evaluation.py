"""Plain evaluation loop: entity-level F1 of a token-classification model on CoNLL sentences."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import DataCollatorForTokenClassification

from prune_trainer.data import entity_scores, stitch_windows, tokenize_and_align, window_sentences
from prune_trainer.data.conll import CONLL_LABELS, Sentence
from prune_trainer.data.tokenize import IGNORE_INDEX


@torch.no_grad()
def evaluate_f1(
    model: nn.Module | Any,
    tokenizer: Any,
    sentences: list[Sentence],
    batch_size: int = 64,
    max_length: int = 128,
    labels: tuple[str, ...] = CONLL_LABELS,
) -> dict[str, float]:
    """``precision``/``recall``/``f1``/``accuracy`` (seqeval, as `make_compute_metrics`) over all
    ``sentences`` (``model``: any callable answering ``model(**batch).logits``, e.g. an `OrtTokenClassifier`);
    batches are formed from length-sorted sentences to cut padding. Sentences longer than
    ``max_length`` sub-tokens are scored in windows (`window_sentences`), stitched back before seqeval."""
    if not sentences:
        raise ValueError("evaluate_f1 got no sentences")
    windows, groups = window_sentences(sentences, tokenizer, max_length)
    ds = tokenize_and_align(windows, tokenizer, max_length, labels=labels)
    order = np.argsort([len(ids) for ids in ds["input_ids"]], kind="stable")
    collator = DataCollatorForTokenClassification(tokenizer)
    model.eval()
    device = getattr(model, "device", None) or next(model.parameters()).device  # a runtime session: its device
    true_tags: list[list[str]] = [[] for _ in order]
    pred_tags: list[list[str]] = [[] for _ in order]
    for i in range(0, len(order), batch_size):
        batch = collator([ds[int(j)] for j in order[i : i + batch_size]])
        label_ids = batch.pop("labels")
        pred = model(**{k: v.to(device) for k, v in batch.items()}).logits.argmax(-1)
        for j, p_row, l_row in zip(order[i : i + batch_size], pred.tolist(), label_ids.tolist(), strict=True):
            keep = [k for k, lab in enumerate(l_row) if lab != IGNORE_INDEX]
            true_tags[j] = [labels[l_row[k]] for k in keep]
            pred_tags[j] = [labels[p_row[k]] for k in keep]
    return entity_scores(stitch_windows(true_tags, groups), stitch_windows(pred_tags, groups))
