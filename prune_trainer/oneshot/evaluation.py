"""Evaluation of the one-shot job per task: entity-level F1 of a token-classification model on CoNLL sentences,
accuracy of a sequence-classification model on labelled texts, and the dispatch table `TASK_EVALUATORS`."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import DataCollatorForTokenClassification

from prune_trainer.data import entity_scores, stitch_windows, tokenize_and_align, window_sentences
from prune_trainer.data.conll import CONLL_LABELS, Sentence
from prune_trainer.data.jsonl import read_jsonl_objects
from prune_trainer.data.tokenize import IGNORE_INDEX
from prune_trainer.llm.perplexity import evaluate_causal_lm
from prune_trainer.llm.seq2seq import check_seq2seq_eval_data, evaluate_seq2seq


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


@torch.no_grad()
def evaluate_accuracy(
    model: nn.Module, tokenizer: Any, texts: list[str], labels: list[int], batch_size: int = 64, max_length: int = 128
) -> dict[str, float]:
    """``accuracy`` (and ``n``) of a sequence-classification model: the share of texts whose arg-max logit is their
    label."""
    if not texts or len(texts) != len(labels):
        raise ValueError(f"evaluate_accuracy needs as many labels as texts (>0), got {len(texts)} and {len(labels)}")
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(texts[i : i + batch_size], truncation=True, max_length=max_length, padding=True,
                        return_tensors="pt")
        pred = model(**{k: v.to(device) for k, v in enc.items()}).logits.argmax(-1).cpu()
        correct += int((pred == torch.tensor(labels[i : i + batch_size])).sum())
    return {"accuracy": correct / len(texts), "n": len(texts)}


def read_labelled_texts(path: str | Path, label2id: dict[str, int]) -> tuple[list[str], list[int]]:
    """Texts and label ids from a JSON Lines file of ``{"text": ..., "label": <id or name>}`` objects."""
    texts, labels = [], []
    for n, row in read_jsonl_objects(path, {"text": str, "label": (int, str)}):
        label = row["label"]
        if isinstance(label, str):
            if label not in label2id:
                raise ValueError(f"{path}:{n}: label {label!r} is not one of the model's labels {sorted(label2id)}")
            label = label2id[label]
        texts.append(str(row["text"]))
        labels.append(int(label))
    return texts, labels


Evaluator = Callable[[nn.Module, Any, dict[str, list[Sentence]], Any], dict[str, Any]]
"""``evaluator(model, tokenizer, splits, cfg: OneShotConfig) -> {"eval_<metric>": value, ...}``."""


def evaluate_token_classification(model: nn.Module, tokenizer: Any, splits: dict[str, list[Sentence]],
                                  cfg: Any) -> dict[str, Any]:
    """Entity F1 on the validation split (and on the test split when the data has one), with timings."""
    out: dict[str, Any] = {}
    for split, prefix in (("validation", "eval"), ("test", "test")):
        if split not in splits:  # every split the data has (CoNLL-2003's test.txt when present)
            continue
        t0 = time.perf_counter()
        scores = evaluate_f1(model, tokenizer, splits[split], cfg.eval_batch_size, cfg.max_length)
        out.update({f"{prefix}_{k}": v for k, v in scores.items()})
        out[f"{prefix}_time_s"] = round(time.perf_counter() - t0, 1)
        out[f"{prefix}_sentences"] = len(splits[split])
    return out


def evaluate_sequence_classification(model: nn.Module, tokenizer: Any, splits: dict[str, list[Sentence]],
                                     cfg: Any) -> dict[str, Any]:
    """Accuracy on ``cfg.eval_file`` (JSON Lines of ``text`` and ``label``; see `read_labelled_texts`)."""
    if not cfg.eval_file:
        raise ValueError("sequence-classification evaluation needs eval_file (JSON Lines of text and label)")
    texts, labels = read_labelled_texts(cfg.eval_file, dict(getattr(model.config, "label2id", None) or {}))
    t0 = time.perf_counter()
    scores = evaluate_accuracy(model, tokenizer, texts, labels, cfg.eval_batch_size, cfg.max_length)
    return {"eval_accuracy": scores["accuracy"], "eval_examples": scores["n"],
            "eval_time_s": round(time.perf_counter() - t0, 1)}


TASK_EVALUATORS: dict[str, Evaluator] = {
    "token-classification": evaluate_token_classification,
    "sequence-classification": evaluate_sequence_classification,
    "causal-lm": evaluate_causal_lm,
    "seq2seq": evaluate_seq2seq,
}
"""Task → its evaluation in the one-shot job (`evaluate_task`). A task without an entry runs only with evaluation
off (``evaluate=False`` / ``--no-eval``); causal-lm: perplexity (`prune_trainer.llm.perplexity.evaluate_causal_lm`);
seq2seq: target-token perplexity (`prune_trainer.llm.seq2seq.evaluate_seq2seq`)."""


def check_evaluation(task: str, cfg: Any, tokenizer: Any = None, label2id: dict[str, int] | None = None) -> None:
    """Before any work: ValueError when ``task`` has no evaluator, or its evaluator lacks its data (a seq2seq or
    sequence-classification ``eval_file`` is parsed — the latter against ``label2id`` when given; without a file, a
    given ``tokenizer`` must have T5's sentinel tokens)."""
    if task not in TASK_EVALUATORS:
        raise ValueError(
            f"no evaluation is available for task {task!r} (available: {sorted(TASK_EVALUATORS)}); "
            "run it with evaluate=False (--no-eval)"
        )
    if task == "sequence-classification" and not cfg.eval_file:
        raise ValueError("sequence-classification evaluation needs eval_file (--eval-file, JSON Lines of text and "
                         "label), or evaluate=False (--no-eval)")
    if task == "sequence-classification" and label2id is not None:
        read_labelled_texts(cfg.eval_file, label2id)
    if task == "seq2seq":
        check_seq2seq_eval_data(cfg, tokenizer)


def evaluate_task(task: str, model: nn.Module, tokenizer: Any, splits: dict[str, list[Sentence]],
                  cfg: Any) -> dict[str, Any]:
    """The dispatch point of the one-shot job's evaluation: ``TASK_EVALUATORS[task](model, tokenizer, splits, cfg)``."""
    check_evaluation(task, cfg, tokenizer)
    return TASK_EVALUATORS[task](model, tokenizer, splits, cfg)
