"""The task of a checkpoint (which head it has) and loading it with that head, for the task-agnostic one-shot job.

A checkpoint's task comes from ``config.architectures`` (``BertForTokenClassification`` → token classification,
``LlamaForCausalLM`` / ``GPT2LMHeadModel`` → causal LM, ``T5ForConditionalGeneration`` → seq2seq), or is given
(``--task``). The model is loaded with its own head (never re-headed as a 9-label tagger); how each task is
evaluated is `prune_trainer.oneshot.evaluation.TASK_EVALUATORS`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from transformers import PretrainedConfig


@dataclass(frozen=True)
class Task:
    """``auto_class``: the transformers Auto class that loads the head; ``suffixes``: architecture class-name
    endings that identify it."""

    auto_class: str
    suffixes: tuple[str, ...]


TASKS: dict[str, Task] = {
    "token-classification": Task("AutoModelForTokenClassification", ("ForTokenClassification",)),
    "sequence-classification": Task("AutoModelForSequenceClassification", ("ForSequenceClassification",)),
    "causal-lm": Task("AutoModelForCausalLM", ("ForCausalLM", "LMHeadModel")),
    "seq2seq": Task("AutoModelForSeq2SeqLM", ("ForConditionalGeneration",)),
}
"""Task name (``--task``) → how its head is loaded and recognised."""


def check_task(task: str | None) -> None:
    """ValueError naming the known tasks unless ``task`` is one of them (or None)."""
    if task is not None and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")


def tasks_of(config: PretrainedConfig) -> list[str]:
    """The tasks whose heads ``config.architectures`` names (usually one)."""
    architectures = list(getattr(config, "architectures", None) or [])
    return [t for t, spec in TASKS.items() if any(a.endswith(spec.suffixes) for a in architectures)]


def task_of(config: PretrainedConfig, task: str | None = None, name: str = "model") -> str:
    """The checkpoint's task: ``task`` when given (it must match a head the checkpoint has, if its architectures
    are recorded), else the one its architectures name. ValueError when it cannot be told or does not match."""
    check_task(task)
    found = tasks_of(config)
    architectures = list(getattr(config, "architectures", None) or [])
    if task is not None:
        if architectures and task not in found:
            raise ValueError(
                f"model {name!r} has no {task} head (architectures: {architectures}); pruning it with a new random "
                f"head would be meaningless: give a checkpoint fine-tuned for {task}"
            )
        return task
    if architectures and not found:
        raise ValueError(
            f"model {name!r} is not a checkpoint with a task head (architectures: {architectures}): one-shot pruning "
            f"needs a fine-tuned model with one of the heads of {sorted(TASKS)}, e.g. results/dense/model"
        )
    if len(found) != 1:
        raise ValueError(
            f"cannot tell the task of model {name!r} from its architectures {architectures or 'none'}: "
            f"pass task (--task) as one of {sorted(TASKS)}"
        )
    return found[0]


def load_model_for_task(name_or_path: str | os.PathLike | None, task: str | None = None) -> tuple[Any, Any, str]:
    """``(model, tokenizer, task)``: the checkpoint with its own head (`task_of`) and its tokenizer. A tokenizer
    without a padding token (GPT-2, Llama) pads with its end-of-sequence token. Token classification keeps the
    CoNLL label names (`load_model_and_tokenizer`)."""
    import transformers

    from prune_trainer.models import load_model_and_tokenizer, load_model_config, resolve_model_path

    path = resolve_model_path(name_or_path)
    task = task_of(load_model_config(path), task, str(name_or_path))
    if task == "token-classification":
        model, tokenizer = load_model_and_tokenizer(path)
        return model, tokenizer, task
    model = getattr(transformers, TASKS[task].auto_class).from_pretrained(path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, task
