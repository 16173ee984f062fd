"""CoNLL-2003 NER data: the original 4-column files in a directory, or the hub dataset.

File format (one token per line): ``WORD POS CHUNK NER``; sentences are separated by blank lines;
``-DOCSTART-`` lines start documents and are skipped.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

CONLL_LABELS: tuple[str, ...] = (
    "O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC",
)
"""Label order of the hub dataset (``conll2003`` / ``eriktks/conll2003``); ids are indices here."""

SPLIT_FILES = {"train": "train.txt", "validation": "valid.txt", "test": "test.txt"}
DATA_DIR_ENV = "PRUNE_TRAINER_CONLL_DIR"
HUB_DATASET = "eriktks/conll2003"


class ConllFormatError(ValueError):
    """A malformed line in a CoNLL file; the message names the file and line number."""


@dataclass
class Sentence:
    tokens: list[str]
    tags: list[str]


def read_conll_file(path: str | os.PathLike, labels: tuple[str, ...] = CONLL_LABELS) -> list[Sentence]:
    """Read one CoNLL-2003 file into sentences.

    Raises:
        ConllFormatError: a line without 4 space-separated columns, with an unknown NER tag or with bytes that
            are not UTF-8, naming ``path:line``.
    """
    path = Path(path)
    known = set(labels)
    sentences: list[Sentence] = []
    tokens: list[str] = []
    tags: list[str] = []
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        lineno = data.count(b"\n", 0, err.start) + 1
        raise ConllFormatError(
            f"{path}:{lineno}: not UTF-8 (byte {data[err.start]:#04x} at offset {err.start}: {err.reason})"
        ) from None
    with io.StringIO(text, newline=None) as f:  # universal newlines, as open() reads text
        for lineno, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith("-DOCSTART-"):
                if tokens:
                    sentences.append(Sentence(tokens, tags))
                    tokens, tags = [], []
                continue
            cols = line.split()
            if len(cols) != 4:
                raise ConllFormatError(
                    f"{path}:{lineno}: expected 4 space-separated columns (word POS chunk NER), "
                    f"got {len(cols)}: {line!r}"
                )
            if cols[3] not in known:
                raise ConllFormatError(f"{path}:{lineno}: unknown NER tag {cols[3]!r} (known: {sorted(known)})")
            tokens.append(cols[0])
            tags.append(cols[3])
    if tokens:
        sentences.append(Sentence(tokens, tags))
    return sentences


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """``data_dir`` if given, else ``$PRUNE_TRAINER_CONLL_DIR``, else None (use the hub)."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if chosen is None or chosen == "":
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"CoNLL-2003 data directory {str(path)!r} does not exist")
    for split in ("train", "validation"):
        if not (path / SPLIT_FILES[split]).is_file():
            raise FileNotFoundError(f"CoNLL-2003 data directory {str(path)!r} has no {SPLIT_FILES[split]}")
    return path


def load_conll_splits(
    data_dir: str | os.PathLike | None = None, hub_dataset: str = HUB_DATASET
) -> dict[str, list[Sentence]]:
    """Load ``train``, ``validation`` and (if present) ``test`` as lists of sentences.

    Source: ``data_dir`` / ``$PRUNE_TRAINER_CONLL_DIR`` if set, else the hub dataset ``hub_dataset``.
    Raises ``ConllFormatError`` naming the file when a split holds no sentence (empty, or only ``-DOCSTART-``).
    """
    path = resolve_data_dir(data_dir)
    if path is None:
        return _load_hub_splits(hub_dataset)
    splits = {}
    for split, fname in SPLIT_FILES.items():
        if (path / fname).is_file():
            splits[split] = read_conll_file(path / fname)
            if not splits[split]:
                raise ConllFormatError(
                    f"{path / fname}: the {split} split holds no sentence (empty or only -DOCSTART-)"
                )
    return splits


def _load_hub_splits(name: str) -> dict[str, list[Sentence]]:
    from datasets import load_dataset

    try:
        ds = load_dataset(name)
    except ConnectionError as err:
        raise ConnectionError(
            f"{err}. No local CoNLL-2003 directory was given either: pass --data-dir (or data.data_dir in a recipe) "
            "or set PRUNE_TRAINER_CONLL_DIR to a directory with train.txt and valid.txt"
        ) from err
    names = ds["train"].features["ner_tags"].feature.names
    return {
        split: [Sentence(list(ex["tokens"]), [names[t] for t in ex["ner_tags"]]) for ex in ds[split]]
        for split in ("train", "validation", "test")
        if split in ds
    }
