"""`DistillationCallback`: knowledge distillation from a teacher with a plain `Trainer`, any pruning method.

Loss (Hinton et al. 2015; as used by movement pruning, Sanh et al. 2020 §5, and oBERT):
``L = (1 - α) · L_task + α · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))``, the KL averaged over the
positions that carry a label (token classification, seq2seq: ``labels != -100``), else over the attention
mask, else over all positions. The ``T²`` keeps the soft-target gradients on the scale of the hard
ones when ``T`` changes. Every logits-like output is distilled (``logits``, or e.g. question answering's
``start_logits`` and ``end_logits``, each a softmax over positions); the KD term is the mean of their terms.

Mechanism: a forward hook on the student (registered first, ``prepend=True``) that, in training mode
only, runs the teacher under ``torch.no_grad()`` on the same inputs and rewrites ``outputs.loss``
(what the Trainer backpropagates). It mixes the model's own loss before any other hook adds its
regulariser (e.g. soft movement pruning's penalty), so those are not scaled by ``1 - α``.
Evaluation is untouched (the hook is inactive in eval mode). The teacher gets the student's inputs without
``labels``; an encoder-decoder (T5, BART) builds its decoder inputs from them, so it gets ``decoder_input_ids``
from its ``prepare_decoder_input_ids_from_labels(labels)`` (or the ``labels`` themselves if it has no such method).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import TrainerCallback

DISTILLATION_KEYS = {"teacher", "alpha", "temperature"}
_NOT_FOR_TEACHER = (
    "labels", "start_positions", "end_positions", "num_items_in_batch", "return_dict", "output_hidden_states",
    "output_attentions",
)


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float,
    select: torch.Tensor | None = None,
) -> torch.Tensor:
    """``T² · mean_positions KL(softmax(t/T) ‖ softmax(s/T))`` over positions where ``select`` is True."""
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    if select is not None:
        kl = kl[select]
    if kl.numel() == 0:
        return student_logits.sum() * 0.0
    return kl.mean() * temperature**2


def logits_outputs(output: Any) -> dict[str, torch.Tensor]:
    """The logits-like tensors of a model output: ``logits`` and every ``*_logits`` key (a dict/`ModelOutput`),
    or element 1 (after the loss) of a tuple. Error naming the output's keys when there is none."""
    if isinstance(output, dict):
        found = {
            k: v for k, v in output.items() if (k == "logits" or k.endswith("_logits")) and isinstance(v, torch.Tensor)
        }
        if not found:
            raise ValueError(
                f"distillation needs logits in the model output ('logits' or '*_logits'), got keys {list(output)}"
            )
        return found
    if isinstance(output, tuple) and len(output) > 1 and isinstance(output[1], torch.Tensor):
        return {"logits": output[1]}
    raise ValueError(f"distillation needs a dict or (loss, logits, ...) model output, got {type(output).__name__}")


def teacher_inputs(teacher: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The student's keyword inputs for the teacher: no labels or loss-only inputs, but an encoder-decoder that
    would build its decoder inputs from ``labels`` gets ``decoder_input_ids`` from
    ``teacher.prepare_decoder_input_ids_from_labels(labels)``, or the ``labels`` when it has no such method."""
    inputs = {k: v for k, v in kwargs.items() if k not in _NOT_FOR_TEACHER}
    labels = kwargs.get("labels")
    encoder_decoder = bool(getattr(getattr(teacher, "config", None), "is_encoder_decoder", False))
    if not encoder_decoder or labels is None or "decoder_input_ids" in inputs or "decoder_inputs_embeds" in inputs:
        return inputs
    if hasattr(teacher, "prepare_decoder_input_ids_from_labels"):
        inputs["decoder_input_ids"] = teacher.prepare_decoder_input_ids_from_labels(labels=labels)
    else:
        inputs["labels"] = labels
    return inputs


class DistillationCallback(TrainerCallback):
    """Add a teacher's soft targets to the training loss.

    Args:
        model: the student, as given to `Trainer`.
        teacher: a model with the same output space (e.g. the dense fine-tuned model); it is put in
            eval mode, frozen and moved to the training device at train begin.
        alpha: weight ``α`` of the distillation term (``1 - α`` on the task loss); 1 = KD only.
        temperature: softmax temperature ``T`` (> 0).

    Example::

        teacher, _ = load_model_and_tokenizer("results/dense/model")
        Trainer(..., callbacks=[MovementPruningCallback(model, ...), DistillationCallback(model, teacher, 0.9, 2.0)])
    """

    def __init__(self, model: nn.Module, teacher: nn.Module, alpha: float = 0.5, temperature: float = 2.0) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"distillation alpha must be in [0, 1], got {alpha!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"distillation temperature must be > 0, got {temperature!r}")
        if teacher is model:
            raise ValueError("the teacher must be a separate model (a frozen copy), not the student itself")
        self.model = model
        self.teacher = teacher
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.last_kd_loss: float | None = None
        self._handle: Any = None
        self.teacher.eval()
        self.teacher.requires_grad_(False)

    def _select(self, kwargs: dict[str, Any], logits: torch.Tensor) -> torch.Tensor | None:
        for key, valid in (("labels", lambda t: t != -100), ("attention_mask", lambda t: t.bool())):
            value = kwargs.get(key)
            if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(logits.shape[:-1]):
                return valid(value)
        return None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if not module.training or self.alpha == 0.0:
            return None
        loss = output.get("loss") if isinstance(output, dict) else (output[0] if isinstance(output, tuple) else None)
        if loss is None:
            return None
        student = logits_outputs(output)
        with torch.no_grad():
            teacher = logits_outputs(self.teacher(*args, **teacher_inputs(self.teacher, kwargs)))
        missing = sorted(set(student) - set(teacher))
        if missing:
            raise ValueError(f"the teacher's output lacks the student's {missing} (teacher has {sorted(teacher)})")
        kd = torch.stack([
            distillation_loss(s, teacher[k], self.temperature, self._select(kwargs, s)) for k, s in student.items()
        ]).mean()
        self.last_kd_loss = float(kd.detach())
        new_loss = (1.0 - self.alpha) * loss + self.alpha * kd.to(loss.dtype)
        if isinstance(output, dict):
            output["loss"] = new_loss
            return output
        return (new_loss, *output[1:])

    def on_train_begin(self, args, state, control, **kwargs):
        self.teacher.to(args.device).eval()
        if self._handle is None:
            self._handle = self.model.register_forward_hook(self._hook, with_kwargs=True, prepend=True)

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.last_kd_loss is not None and not any(k.startswith("eval_") for k in logs):
            logs["distill/kd_loss"] = self.last_kd_loss


def make_distillation_callback(
    model: nn.Module, cfg: dict[str, Any], init_from: str | None = None
) -> DistillationCallback:
    """From a recipe's ``distillation: {teacher, alpha, temperature}``; ``teacher: init_from`` means the
    recipe's ``init_from`` model (the dense fine-tuned one)."""
    from prune_trainer.models import load_model_and_tokenizer

    if not isinstance(cfg, dict):
        raise ValueError(f"recipe 'distillation' must be a mapping, got {cfg!r}")
    unknown = set(cfg) - DISTILLATION_KEYS
    if unknown:
        raise ValueError(f"unknown distillation key(s) {sorted(unknown)}; allowed: {sorted(DISTILLATION_KEYS)}")
    teacher_src = cfg.get("teacher", "init_from")
    if teacher_src == "init_from":
        if not init_from:
            raise ValueError("distillation.teacher is 'init_from' but the recipe has no init_from")
        teacher_src = init_from
    try:
        teacher, _ = load_model_and_tokenizer(teacher_src)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"distillation.teacher: {err}") from err
    return DistillationCallback(model, teacher, cfg.get("alpha", 0.5), cfg.get("temperature", 2.0))
