"""Data: CoNLL-2003 reading, tokenization with label alignment, entity-level metrics."""

from prune_trainer.data.conll import (
    CONLL_LABELS,
    DATA_DIR_ENV,
    ConllFormatError,
    Sentence,
    load_conll_splits,
    read_conll_file,
    resolve_data_dir,
)
from prune_trainer.data.metrics import (
    align_predictions,
    entity_scores,
    make_compute_metrics,
    preprocess_logits_for_metrics,
    stitch_windows,
)
from prune_trainer.data.tokenize import IGNORE_INDEX, tokenize_and_align, used_token_ids, window_sentences

__all__ = [
    "CONLL_LABELS",
    "DATA_DIR_ENV",
    "IGNORE_INDEX",
    "ConllFormatError",
    "Sentence",
    "align_predictions",
    "entity_scores",
    "load_conll_splits",
    "make_compute_metrics",
    "preprocess_logits_for_metrics",
    "read_conll_file",
    "resolve_data_dir",
    "stitch_windows",
    "tokenize_and_align",
    "used_token_ids",
    "window_sentences",
]
