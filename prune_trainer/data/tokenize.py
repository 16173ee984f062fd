"""Tokenization with word-to-sub-token label alignment for token classification.

The first sub-token of each word carries the word's label id; the other sub-tokens and special
tokens get -100 (ignored by the loss and by the metric). For evaluation, `window_sentences` splits sentences
longer than ``max_length`` sub-tokens into word-aligned windows, so that no gold entity is truncated away.
"""

from __future__ import annotations

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from prune_trainer.data.conll import CONLL_LABELS, Sentence

IGNORE_INDEX = -100


def tokenize_and_align(
    sentences: list[Sentence],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int = 128,
    max_samples: int | None = None,
    labels: tuple[str, ...] = CONLL_LABELS,
) -> Dataset:
    """Build a `datasets.Dataset` with ``input_ids``, ``attention_mask`` and aligned ``labels``.

    Needs a fast tokenizer (``word_ids``). ``max_samples`` keeps the first N sentences.
    """
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"a fast tokenizer is needed for label alignment, got {type(tokenizer).__name__}")
    if max_samples is not None:
        if max_samples <= 0:
            raise ValueError(f"max_samples must be positive, got {max_samples}")
        sentences = sentences[:max_samples]
    label_to_id = {label: i for i, label in enumerate(labels)}
    enc = tokenizer(
        [s.tokens for s in sentences], is_split_into_words=True, truncation=True, max_length=max_length
    )
    all_labels = []
    for i, sent in enumerate(sentences):
        previous = None
        row = []
        for word_id in enc.word_ids(i):
            if word_id is None or word_id == previous:
                row.append(IGNORE_INDEX)
            else:
                row.append(label_to_id[sent.tags[word_id]])
            previous = word_id
        all_labels.append(row)
    data = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": all_labels}
    if "token_type_ids" in enc:
        data["token_type_ids"] = enc["token_type_ids"]
    return Dataset.from_dict(data)


def window_sentences(
    sentences: list[Sentence], tokenizer: PreTrainedTokenizerBase, max_length: int = 128
) -> tuple[list[Sentence], list[int]]:
    """Split each sentence longer than ``max_length`` sub-tokens (special tokens included) into consecutive
    word-aligned windows of at most ``max_length`` sub-tokens; return the windows and, per window, the index of
    its sentence (`stitch_windows` joins their predictions back). Shorter sentences are returned as they are.

    A single word longer than a window gets a window of its own (truncated there; its label is on its first
    sub-token, so it is still scored)."""
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    if budget < 1:
        raise ValueError(f"max_length {max_length} leaves no room for a word after the special tokens")
    enc = tokenizer([s.tokens for s in sentences], is_split_into_words=True, add_special_tokens=False)
    windows: list[Sentence] = []
    groups: list[int] = []
    for i, sent in enumerate(sentences):
        if len(enc["input_ids"][i]) <= budget:
            windows.append(sent)
            groups.append(i)
            continue
        word_ids = np.array([w for w in enc.word_ids(i) if w is not None])
        pieces = np.bincount(word_ids, minlength=len(sent.tokens))
        start, used = 0, 0
        for w, n in enumerate(pieces.tolist()):
            if used + n > budget and w > start:
                windows.append(Sentence(sent.tokens[start:w], sent.tags[start:w]))
                groups.append(i)
                start, used = w, 0
            used += n
        windows.append(Sentence(sent.tokens[start:], sent.tags[start:]))
        groups.append(i)
    return windows, groups


def used_token_ids(sentences: list[Sentence], tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Sorted ids of every sub-token the tokenizer produces for ``sentences``, plus its special tokens (the task's
    vocabulary, e.g. to trim the word embeddings to the rows a task uses)."""
    batch = tokenizer([s.tokens for s in sentences], is_split_into_words=True, truncation=False)
    used = {int(i) for ids in batch["input_ids"] for i in ids}
    return sorted(used | {int(i) for i in tokenizer.all_special_ids})
