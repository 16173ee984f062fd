"""T5's span-corruption objective (Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer", §3.1.4 and §3.3.4): (source, target) pairs made from plain text, for a seq2seq model's
calibration and perplexity when no task data is given.

Of a sequence of ``L`` tokens, ``round(0.15·L)`` are noise, in ``round(noise / 3)`` spans (mean span length 3); the
noise and non-noise tokens are each cut into that many non-empty runs at uniformly random points and interleaved,
non-noise first (the reference ``random_spans_noise_mask``). The source keeps the non-noise tokens and puts the
sentinel ``<extra_id_k>`` in place of noise span ``k``; the target is ``<extra_id_0> span_0 <extra_id_1> span_1 …``;
both end with EOS (when the tokenizer has one).
"""

from __future__ import annotations

import random
from typing import Any

import torch

NOISE_DENSITY = 0.15
MEAN_SPAN_LENGTH = 3.0
SENTINEL = "<extra_id_{}>"


def sentinel_ids(tokenizer: Any) -> list[int]:
    """The ids of the tokenizer's sentinels ``<extra_id_0>``, ``<extra_id_1>``, … (consecutive from 0); ValueError
    when it has none (a tokenizer not made for span corruption, unlike T5's)."""
    vocab = tokenizer.get_vocab()
    ids = []
    while SENTINEL.format(len(ids)) in vocab:
        ids.append(vocab[SENTINEL.format(len(ids))])
    if not ids:
        raise ValueError(
            f"the tokenizer ({type(tokenizer).__name__}) has no sentinel tokens <extra_id_0>, ...: the default "
            "seq2seq data is T5's span corruption of the CoNLL-2003 text; give (source, target) pairs with "
            "--eval-file (JSON Lines of {\"source\", \"target\"}) or run with --no-eval"
        )
    return ids


def has_sentinels(tokenizer: Any) -> bool:
    """Whether the tokenizer has ``<extra_id_0>`` (T5's first sentinel)."""
    return SENTINEL.format(0) in tokenizer.get_vocab()


def noise_span_lengths(length: int, rng: random.Random, noise_density: float = NOISE_DENSITY,
                       mean_span_length: float = MEAN_SPAN_LENGTH) -> tuple[list[int], list[int]]:
    """``(non-noise run lengths, noise span lengths)``, equally many, in sequence order (non-noise first) and
    summing to ``length`` (the reference ``random_spans_noise_mask``)."""
    if length < 2:
        raise ValueError(f"span corruption needs at least 2 tokens, got {length}")
    n_noise = min(max(round(length * noise_density), 1), length - 1)
    n_spans = max(round(n_noise / mean_span_length), 1)
    n_spans = min(n_spans, n_noise, length - n_noise)

    def cut(n_items: int) -> list[int]:  # n_items into n_spans non-empty runs at uniform random cut points
        points = sorted(rng.sample(range(1, n_items), n_spans - 1))
        return [b - a for a, b in zip([0, *points], [*points, n_items], strict=True)]

    return cut(length - n_noise), cut(n_noise)


def span_corrupt(ids: list[int], sentinels: list[int], rng: random.Random,
                 eos_id: int | None = None) -> tuple[list[int], list[int]]:
    """``(source, target)`` of the token ids ``ids`` (module doc); ValueError when the spans outnumber the
    sentinels."""
    keep, noise = noise_span_lengths(len(ids), rng)
    if len(noise) > len(sentinels):
        raise ValueError(f"{len(ids)} tokens make {len(noise)} noise spans but the tokenizer has only "
                         f"{len(sentinels)} sentinels: use shorter sequences (--max-length)")
    source: list[int] = []
    target: list[int] = []
    pos = 0
    for k, (n_keep, n_noise) in enumerate(zip(keep, noise, strict=True)):
        source += [*ids[pos : pos + n_keep], sentinels[k]]
        target += [sentinels[k], *ids[pos + n_keep : pos + n_keep + n_noise]]
        pos += n_keep + n_noise
    if eos_id is not None:
        source.append(eos_id)
        target.append(eos_id)
    return source, target


def span_corruption_pairs(chunks: torch.Tensor, tokenizer: Any, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    """The span-corrupted ``(source, target)`` id pairs of the rows of ``chunks`` (``(n, L)`` token ids), one
    seeded random stream over the rows in order."""
    sentinels = sentinel_ids(tokenizer)
    reserved = set(sentinels)
    if reserved & set(chunks.unique().tolist()):
        raise ValueError("the text itself contains sentinel tokens <extra_id_k>; span corruption needs text without")
    rng = random.Random(seed)
    eos = getattr(tokenizer, "eos_token_id", None)
    return [span_corrupt(row, sentinels, rng, eos) for row in chunks.tolist()]
