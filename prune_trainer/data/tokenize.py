"""Tokenization with word-to-sub-token label alignment for token classification.

The first sub-token of each word carries the word's label id; the other sub-tokens and special
tokens get -100 (ignored by the loss and by the metric).
"""

from __future__ import annotations

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
