"""Plain text for causal language models: CoNLL-2003 (Reuters news) detokenised, any text file, or WikiText-2
from the hub; tokenised once into a flat id sequence, from which calibration windows are drawn.

Calibration follows SparseGPT's and Wanda's reference sampling (Frantar & Alistarh 2023, §5; Sun et al. 2024, §4):
``n`` windows of ``seqlen`` consecutive tokens starting at uniformly random positions of the tokenised training
text (seeded). Evaluation text is scored by `prune_trainer.llm.perplexity`.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import torch

from prune_trainer.data.conll import Sentence, load_conll_splits

NO_SPACE_BEFORE = frozenset({",", ".", ";", ":", "!", "?", ")", "]", "}", "%", "'s", "'S", "n't", "N'T", "'re", "'ve",
                             "'ll", "'d", "'m", "'", "..."})
NO_SPACE_AFTER = frozenset({"(", "[", "{", "$", "US$", "#"})
CONLL_TEXT_SOURCES = {"conll-train": "train", "conll-validation": "validation", "conll-test": "test"}
WIKITEXT2 = ("Salesforce/wikitext", "wikitext-2-raw-v1")
WIKITEXT_SOURCES = {"wikitext2-train": "train", "wikitext2-validation": "validation", "wikitext2-test": "test"}


def detokenize(tokens: list[str]) -> str:
    """Join CoNLL/Penn-style tokens into running text: no space before closing punctuation and clitics
    (``,`` ``.`` ``)`` ``'s`` ``n't`` ...), none after opening brackets and currency signs, and straight double
    quotes alternating between opening (space before) and closing (space after)."""
    out: list[str] = []
    glue_next = True  # no space before the first token
    open_quote = False
    for tok in tokens:
        if tok == '"':
            closing = open_quote
            open_quote = not open_quote
            out.append(tok if closing or glue_next else " " + tok)
            glue_next = not closing
            continue
        glue = glue_next or tok in NO_SPACE_BEFORE
        out.append(tok if glue else " " + tok)
        glue_next = tok in NO_SPACE_AFTER
    return "".join(out)


def sentences_text(sentences: list[Sentence]) -> str:
    """The detokenised sentences, one per line (CoNLL keeps no paragraph structure inside a document)."""
    if not sentences:
        raise ValueError("no sentences given: the text would be empty")
    return "\n".join(detokenize(s.tokens) for s in sentences)


def load_text(source: str, data_dir: str | os.PathLike | None = None) -> str:
    """Text of ``source``: ``conll-train`` / ``conll-validation`` / ``conll-test`` (CoNLL-2003 from ``data_dir``,
    ``$PRUNE_TRAINER_CONLL_DIR`` or the hub), ``wikitext2-train`` / ``-validation`` / ``-test`` (the hub dataset
    ``wikitext-2-raw-v1``, lines joined with blank lines as in the SparseGPT evaluation), or a UTF-8 text file."""
    if source in CONLL_TEXT_SOURCES:
        splits = load_conll_splits(data_dir)
        split = CONLL_TEXT_SOURCES[source]
        if split not in splits:
            raise ValueError(f"text source {source!r}: the CoNLL-2003 data has no {split} split")
        return sentences_text(splits[split])
    if source in WIKITEXT_SOURCES:
        from datasets import load_dataset

        rows = load_dataset(*WIKITEXT2, split=WIKITEXT_SOURCES[source])
        return "\n\n".join(rows["text"])
    path = Path(source).expanduser()
    if not path.is_file():
        known = [*CONLL_TEXT_SOURCES, *WIKITEXT_SOURCES]
        raise FileNotFoundError(f"text source {source!r} is neither a file nor one of {known}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"text file {str(path)!r} is empty")
    return text


def tokenize_text(text: str, tokenizer: Any) -> torch.Tensor:
    """The whole text as one 1-D ``int64`` id sequence (no special tokens added)."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if not ids:
        raise ValueError("the text tokenises to 0 tokens")
    return torch.as_tensor(ids, dtype=torch.long)


def random_windows(ids: torch.Tensor, n: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``(n, seqlen)`` windows of consecutive ids starting at seeded uniform positions (SparseGPT's sampling)."""
    if ids.dim() != 1:
        raise ValueError(f"ids must be a 1-D token sequence, got shape {tuple(ids.shape)}")
    if not isinstance(n, int) or n <= 0 or not isinstance(seqlen, int) or seqlen <= 0:
        raise ValueError(f"window count and length must be positive integers, got n={n!r}, seqlen={seqlen!r}")
    if ids.numel() < seqlen:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of seqlen={seqlen}")
    rng = random.Random(seed)
    starts = torch.tensor([rng.randint(0, ids.numel() - seqlen) for _ in range(n)])
    return ids[starts[:, None] + torch.arange(seqlen)]


def calibration_windows(
    tokenizer: Any, n: int = 64, seqlen: int = 512, source: str = "conll-train",
    data_dir: str | os.PathLike | None = None, seed: int = 0,
) -> torch.Tensor:
    """``n`` random ``seqlen``-token windows of the text ``source`` (see `load_text`), ``(n, seqlen)``."""
    return random_windows(tokenize_text(load_text(source, data_dir), tokenizer), n, seqlen, seed)


def text_calibration_batches(
    sentences: list[Sentence], tokenizer: Any, n_samples: int, batch_size: int = 8, seqlen: int = 512, seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """Calibration batches for a causal LM: ``n_samples`` random ``seqlen``-token windows of the detokenised
    ``sentences`` (`window_batches`)."""
    return window_batches(tokenize_text(sentences_text(sentences), tokenizer), n_samples, batch_size, seqlen, seed)


def window_batches(
    ids: torch.Tensor, n_samples: int, batch_size: int = 8, seqlen: int = 512, seed: int = 0,
) -> list[dict[str, torch.Tensor]]:
    """``n_samples`` random ``seqlen``-token windows of the id sequence ``ids`` (`random_windows`), as
    ``input_ids`` / ``attention_mask`` batches of ``batch_size`` (the last one may be smaller)."""
    if batch_size <= 0:
        raise ValueError(f"calibration batch size must be positive, got {batch_size}")
    windows = random_windows(ids, n_samples, seqlen, seed)
    return [{"input_ids": w, "attention_mask": torch.ones_like(w)} for w in windows.split(batch_size)]
