"""Encoder-decoder (seq2seq) models such as T5: (source, target) pairs, their batches, and teacher-forced
target-token perplexity ``PPL = exp(Σ NLL / #target tokens)``: the decoder reads the target shifted right behind its
start token and every target token is scored (labels of padding are ``-100``).

Pairs come from a JSON Lines file of ``{"source": ..., "target": ...}`` objects, or are made from plain text by T5's
span corruption (`prune_trainer.data.span_corruption`): non-overlapping ``max_length``-token chunks of the CoNLL-2003
validation text for the one-shot job's evaluation (fixed seed `EVAL_SEED`), random windows of the training text
for its calibration.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from prune_trainer.data.conll import Sentence
from prune_trainer.data.jsonl import read_jsonl_objects
from prune_trainer.data.span_corruption import sentinel_ids, span_corruption_pairs
from prune_trainer.data.text import random_windows, sentences_text, tokenize_text
from prune_trainer.data.tokenize import IGNORE_INDEX
from prune_trainer.llm.perplexity import MAX_LOGITS

EVAL_SEED = 0
"""Seed of the span corruption of the default evaluation text (fixed: every run scores the same pairs)."""

IdPair = tuple[list[int], list[int]]


@dataclass
class Seq2SeqPerplexity:
    perplexity: float
    nll: float  # mean negative log-likelihood per target token (nats)
    n_tokens: int  # scored target tokens
    n_pairs: int
    time_s: float


def read_pairs(path: str | Path) -> list[tuple[str, str]]:
    """``(source, target)`` texts of a JSON Lines file of ``{"source": str, "target": str}`` objects (blank lines
    skipped); ValueError naming ``file:line`` for a line that is not such an object, or when there is none."""
    pairs = [(row["source"], row["target"]) for _, row in read_jsonl_objects(path, {"source": str, "target": str})]
    if not pairs:
        raise ValueError(f"{path}: no (source, target) pairs in the file")
    return pairs


def tokenize_pairs(pairs: list[tuple[str, str]], tokenizer: Any, max_length: int) -> tuple[list[IdPair], int]:
    """``(id pairs, number of pairs cut)``: sources and targets tokenised with the tokenizer's special tokens (T5:
    a final EOS), each cut to ``max_length`` tokens keeping its final special token."""
    sources = tokenizer([s for s, _ in pairs])["input_ids"]
    targets = tokenizer(text_target=[t for _, t in pairs])["input_ids"]
    special = set(getattr(tokenizer, "all_special_ids", []))

    def cut(ids: list[int]) -> list[int]:
        if len(ids) <= max_length:
            return ids
        return ids[: max_length - 1] + ids[-1:] if ids[-1] in special else ids[:max_length]

    out = [(cut(s), cut(t)) for s, t in zip(sources, targets, strict=True)]
    n_cut = sum(len(s) > max_length or len(t) > max_length for s, t in zip(sources, targets, strict=True))
    if any(not t for _, t in out):
        raise ValueError("a target tokenises to 0 tokens: there is nothing to score")
    return out, n_cut


def text_pairs(ids: torch.Tensor, tokenizer: Any, length: int, seed: int = EVAL_SEED) -> list[IdPair]:
    """Span-corrupted pairs of the non-overlapping ``length``-token chunks of the 1-D ids (the tail dropped)."""
    n = ids.numel() // length
    if n == 0:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one chunk of max_length={length}")
    return span_corruption_pairs(ids[: n * length].view(n, length), tokenizer, seed)


def _pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def pair_batches(model: nn.Module, pairs: list[IdPair], pad_id: int, batch_size: int,
                 labels: bool = True) -> list[dict[str, torch.Tensor]]:
    """Length-sorted padded batches: ``input_ids``, ``attention_mask``, ``decoder_input_ids`` (the target shifted
    right, `prepare_decoder_input_ids_from_labels`), ``decoder_attention_mask`` (the real target positions) and,
    with ``labels``, the target with ``-100`` on padding."""
    if not pairs or batch_size <= 0:
        raise ValueError(f"pair_batches needs pairs and a positive batch size, got {len(pairs)} and {batch_size}")
    if not hasattr(model, "prepare_decoder_input_ids_from_labels"):
        raise ValueError(f"{type(model).__name__} is not an encoder-decoder with decoder inputs from labels")
    order = sorted(range(len(pairs)), key=lambda i: (len(pairs[i][0]), len(pairs[i][1])))
    batches = []
    for start in range(0, len(order), batch_size):
        chosen = [pairs[i] for i in order[start : start + batch_size]]
        target = _pad([t for _, t in chosen], IGNORE_INDEX)
        batch = {"input_ids": _pad([s for s, _ in chosen], pad_id),
                 "attention_mask": _pad([[1] * len(s) for s, _ in chosen], 0),
                 "decoder_input_ids": model.prepare_decoder_input_ids_from_labels(labels=target),
                 "decoder_attention_mask": (target != IGNORE_INDEX).long()}
        if labels:
            batch["labels"] = target
        batches.append(batch)
    return batches


@torch.no_grad()
def seq2seq_perplexity(model: nn.Module, pairs: list[IdPair], pad_id: int, batch_size: int = 8) -> Seq2SeqPerplexity:
    """Teacher-forced perplexity of ``model`` over the target tokens of ``pairs`` (module doc), in length-sorted
    batches; the sum of the NLLs is accumulated in float64. Raises on a non-finite loss."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start, total, count = time.perf_counter(), 0.0, 0
    try:
        for batch in pair_batches(model, pairs, pad_id, batch_size):
            labels = batch.pop("labels").to(device)
            logits = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).logits.float()
            nll = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
            total += float(nll.double().sum())
            count += int((labels != IGNORE_INDEX).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("seq2seq perplexity scored 0 target tokens")
    nll_mean = total / count
    if not math.isfinite(nll_mean):
        raise FloatingPointError(f"non-finite mean NLL {nll_mean} over {count} target tokens: the model outputs "
                                 "inf/nan")
    return Seq2SeqPerplexity(math.exp(nll_mean), nll_mean, count, len(pairs), time.perf_counter() - start)


def pad_id_of(tokenizer: Any, model: nn.Module) -> int:
    """The padding id: the tokenizer's, else the model config's, else 0 (padding is masked either way)."""
    for value in (getattr(tokenizer, "pad_token_id", None), getattr(model.config, "pad_token_id", None)):
        if value is not None:
            return int(value)
    return 0


def span_corruption_batches(model: nn.Module, tokenizer: Any, ids: torch.Tensor, n_samples: int,
                            batch_size: int = 8, seqlen: int = 128, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Calibration batches for a seq2seq model: ``n_samples`` random ``seqlen``-token windows of the 1-D ids
    (`random_windows`, SparseGPT's sampling), span-corrupted (seeded), with decoder inputs and masks (no labels)."""
    if batch_size <= 0:
        raise ValueError(f"calibration batch size must be positive, got {batch_size}")
    pairs = span_corruption_pairs(random_windows(ids, n_samples, seqlen, seed), tokenizer, seed)
    return pair_batches(model, pairs, pad_id_of(tokenizer, model), batch_size, labels=False)


def check_seq2seq_eval_data(cfg: Any, tokenizer: Any = None) -> None:
    """Before any work: the pairs of ``cfg.eval_file`` parse (`read_pairs`), or, without one, the tokenizer (when
    given) has the sentinels of the default span-corruption data."""
    if cfg.eval_file:
        read_pairs(cfg.eval_file)
    elif tokenizer is not None:
        sentinel_ids(tokenizer)


def evaluate_seq2seq(model: nn.Module, tokenizer: Any, splits: dict[str, list[Sentence]], cfg: Any) -> dict[str, Any]:
    """The one-shot job's seq2seq evaluation (`TASK_EVALUATORS`): target-token perplexity of the pairs of
    ``cfg.eval_file`` (sources and targets cut to ``cfg.max_length`` tokens), else of the span-corrupted
    ``cfg.max_length``-token chunks of the CoNLL-2003 validation text (seed `EVAL_SEED`)."""
    out: dict[str, Any] = {}
    if cfg.eval_file:
        pairs, out["eval_truncated_pairs"] = tokenize_pairs(read_pairs(cfg.eval_file), tokenizer, cfg.max_length)
        out["eval_data"] = str(cfg.eval_file)
    else:
        ids = tokenize_text(sentences_text(splits["validation"]), tokenizer)
        pairs = text_pairs(ids, tokenizer, cfg.max_length)
        out["eval_data"] = f"span corruption of the CoNLL-2003 validation text (seed {EVAL_SEED})"
    vocab = int(getattr(model.config, "vocab_size", 0) or 1)
    longest = max(len(t) for _, t in pairs)
    batch_size = max(1, min(cfg.eval_batch_size, MAX_LOGITS // (longest * vocab)))  # float32 logits <= 1 GiB
    r = seq2seq_perplexity(model, pairs, pad_id_of(tokenizer, model), batch_size)
    return {"eval_perplexity": r.perplexity, "eval_nll": r.nll, "eval_tokens": r.n_tokens, "eval_pairs": r.n_pairs,
            "eval_batch_size": batch_size, "eval_time_s": round(r.time_s, 1), **out}
