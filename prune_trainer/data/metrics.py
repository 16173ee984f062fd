"""Entity-level precision / recall / F1 with seqeval (the numbers of `evaluate`'s seqeval metric).

`evaluate.load("seqeval")` fetches the metric script from the hub, so seqeval is called directly:
micro-averaged over entities, default (conlleval-style) mode, as `evaluate` does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from seqeval.metrics import accuracy_score, f1_score, precision_score, recall_score

from prune_trainer.data.conll import CONLL_LABELS
from prune_trainer.data.tokenize import IGNORE_INDEX


def entity_scores(true_tags: list[list[str]], pred_tags: list[list[str]]) -> dict[str, float]:
    """``precision``, ``recall``, ``f1`` (entity level, micro) and token ``accuracy``."""
    return {
        "precision": float(precision_score(true_tags, pred_tags)),
        "recall": float(recall_score(true_tags, pred_tags)),
        "f1": float(f1_score(true_tags, pred_tags)),
        "accuracy": float(accuracy_score(true_tags, pred_tags)),
    }


def align_predictions(
    predictions: np.ndarray, label_ids: np.ndarray, labels: tuple[str, ...] = CONLL_LABELS
) -> tuple[list[list[str]], list[list[str]]]:
    """Drop ignored positions (-100) and map ids to tag strings. ``predictions``: logits or ids."""
    if predictions.ndim == 3:
        predictions = predictions.argmax(-1)
    true_tags, pred_tags = [], []
    for pred_row, label_row in zip(predictions, label_ids):
        keep = label_row != IGNORE_INDEX
        true_tags.append([labels[i] for i in label_row[keep]])
        pred_tags.append([labels[i] for i in pred_row[keep]])
    return true_tags, pred_tags


def stitch_windows(tags: list[list[str]], groups: list[int] | None) -> list[list[str]]:
    """Concatenate the tag lists of consecutive windows of one sentence (``groups[i]``: sentence of window i, as
    `window_sentences` returns); ``groups=None`` leaves ``tags`` as they are."""
    if groups is None:
        return tags
    if len(groups) != len(tags):
        raise ValueError(f"{len(tags)} evaluated examples but {len(groups)} window groups: not the same data set")
    out: list[list[str]] = []
    previous = None
    for group, row in zip(groups, tags):
        if group == previous:
            out[-1] = out[-1] + row
        else:
            out.append(list(row))
        previous = group
    return out


def make_compute_metrics(labels: tuple[str, ...] = CONLL_LABELS, groups: list[int] | None = None) -> Callable:
    """A `Trainer` ``compute_metrics`` giving ``precision``, ``recall``, ``f1``, ``accuracy``; with ``groups``
    (from `window_sentences`), windows are stitched back into their sentences before scoring."""

    def compute_metrics(eval_pred) -> dict[str, float]:
        predictions, label_ids = eval_pred.predictions, eval_pred.label_ids
        if isinstance(predictions, tuple):
            predictions = predictions[0]
        true_tags, pred_tags = align_predictions(np.asarray(predictions), np.asarray(label_ids), labels)
        return entity_scores(stitch_windows(true_tags, groups), stitch_windows(pred_tags, groups))

    return compute_metrics


def preprocess_logits_for_metrics(logits, labels):
    """Reduce logits to argmax ids during evaluation (saves host memory on large eval sets)."""
    if isinstance(logits, tuple):
        logits = logits[0]
    return logits.argmax(-1)
