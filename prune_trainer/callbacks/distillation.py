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

DISTILLATION_KEYS = {"teacher", "alpha", "temperature", "hidden_weight", "hidden_layers", "match_layers"}
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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_distillation_values(
    alpha: Any = 0.5, temperature: Any = 2.0, hidden_weight: Any = 0.0, hidden_layers: Any = "all",
    match_layers: Any = False, where: str = "distillation",
) -> None:
    """ValueError naming the key (``<where>.<key>``) for a value out of its range or of the wrong type."""
    if not _is_number(alpha) or not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{where}.alpha must be in [0, 1], got {alpha!r}")
    if not _is_number(temperature) or not 0.0 < temperature < float("inf"):
        raise ValueError(f"{where}.temperature must be > 0, got {temperature!r}")
    if not _is_number(hidden_weight) or not 0.0 <= hidden_weight < float("inf"):
        raise ValueError(f"{where}.hidden_weight must be a finite number >= 0, got {hidden_weight!r}")
    layers_ok = hidden_layers == "all" or (
        isinstance(hidden_layers, list) and hidden_layers and len(set(hidden_layers)) == len(hidden_layers)
        and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in hidden_layers)
    )
    if not layers_ok:
        raise ValueError(
            f"{where}.hidden_layers must be 'all' or a non-empty list of distinct layer indices >= 0, "
            f"got {hidden_layers!r}"
        )
    if not isinstance(match_layers, bool):
        raise ValueError(f"{where}.match_layers must be true or false, got {match_layers!r}")


def check_distillation(cfg: Any, source: str | None = None) -> None:
    """Check a recipe's ``distillation`` mapping (keys, value types and ranges) without loading the teacher;
    ``source`` (the recipe) prefixes the errors."""
    prefix = f"{source}: " if source else ""
    if not isinstance(cfg, dict):
        raise ValueError(f"{prefix}recipe 'distillation' must be a mapping, got {cfg!r}")
    unknown = set(cfg) - DISTILLATION_KEYS
    if unknown:
        raise ValueError(
            f"{prefix}unknown distillation key(s) {sorted(unknown)}; allowed: {sorted(DISTILLATION_KEYS)}"
        )
    if not isinstance(cfg.get("teacher", "init_from"), str):
        raise ValueError(f"{prefix}distillation.teacher must be a path or 'init_from', got {cfg['teacher']!r}")
    check_distillation_values(**{k: v for k, v in cfg.items() if k != "teacher"}, where=f"{prefix}distillation")


def _masked_mean(values: torch.Tensor, select: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values [..., N, L]`` over the ``select``-ed positions ``[N, L]`` (all when None): ``[...]``."""
    if select is None:
        return values.mean((-2, -1))
    weight = select.to(values.dtype)
    return (values * weight).sum((-2, -1)) / weight.sum().clamp(min=1.0)


def _pair_mse(student: torch.Tensor, teacher: torch.Tensor, select: torch.Tensor | None) -> torch.Tensor:
    """``[T]`` MSEs of paired hidden states ``[T, N, L, D]`` (mean over features and selected positions)."""
    return _masked_mean((student.float() - teacher.float()).pow(2).mean(-1), select)


@torch.no_grad()
def _all_pairs_mse(student: torch.Tensor, teacher: torch.Tensor, select: torch.Tensor | None) -> torch.Tensor:
    """``[S, T]`` MSEs of every student layer ``[S, N, L, D]`` against every teacher layer ``[T, N, L, D]``, from
    ``‖s − t‖² = ‖s‖² + ‖t‖² − 2 s·t`` per position (memory ``S·T·N·L``, not ``S·T·N·L·D``)."""
    s, t = student.float(), teacher.float()
    sq = s.pow(2).sum(-1)[:, None] + t.pow(2).sum(-1)[None] - 2 * torch.einsum("snld,tnld->stnl", s, t)
    return _masked_mean(sq / s.shape[-1], select)


def hidden_distillation_loss(
    student_hidden: tuple[torch.Tensor, ...] | list[torch.Tensor],
    teacher_hidden: tuple[torch.Tensor, ...] | list[torch.Tensor],
    layers: str | list[int] = "all",
    match_layers: bool = False,
    select: torch.Tensor | None = None,
) -> torch.Tensor:
    """``mean_{i∈T} MSE(h_s^{m(i)}, h_t^i)`` over the layer outputs ``hidden[1:]`` (``hidden[0]`` = embeddings);
    ``m(i) = i``, or ``argmin_j MSE(h_s^j, h_t^i)`` with ``match_layers`` (CoFi, Xia et al. 2022, eq. 6).

    Raises:
        ValueError: different hidden sizes, a layer index past the teacher's layers, or (without matching)
            different layer counts.
    """
    s_layers, t_layers = list(student_hidden[1:]), list(teacher_hidden[1:])
    if s_layers[0].shape[-1] != t_layers[0].shape[-1]:
        raise ValueError(
            f"hidden-state distillation needs equal hidden sizes, got student {s_layers[0].shape[-1]} and "
            f"teacher {t_layers[0].shape[-1]}"
        )
    chosen = list(range(len(t_layers))) if layers == "all" else list(layers)
    if max(chosen) >= len(t_layers):
        raise ValueError(f"distillation.hidden_layers {chosen}: the teacher has layers 0..{len(t_layers) - 1}")
    if not match_layers and len(s_layers) != len(t_layers):
        raise ValueError(
            f"the student has {len(s_layers)} layers and the teacher {len(t_layers)}: hidden-state distillation "
            "then needs match_layers: true"
        )
    teacher = torch.stack([t_layers[i] for i in chosen])
    if match_layers:
        matched = _all_pairs_mse(torch.stack(s_layers).detach(), teacher, select).argmin(0).tolist()
    else:
        matched = chosen
    return _pair_mse(torch.stack([s_layers[j] for j in matched]), teacher, select).mean()


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
    """Add a teacher's soft targets (and, with ``hidden_weight > 0``, its hidden states) to the training loss.

    Args:
        model: the student, as given to `Trainer`.
        teacher: a model with the same output space (e.g. the dense fine-tuned model); it is put in
            eval mode, frozen and moved to the training device at train begin.
        alpha: weight ``α`` of the distillation term (``1 - α`` on the task loss); 1 = KD only.
        temperature: softmax temperature ``T`` (> 0).
        hidden_weight: weight ``β`` (>= 0) of the hidden-state term added to the loss; 0 = logits only.
        hidden_layers: the teacher layers distilled by that term, ``"all"`` or a list of layer indices.
        match_layers: pair each teacher layer with the student layer of smallest MSE (CoFi) instead of its own.

    Example::

        teacher, _ = load_model_and_tokenizer("results/dense/model")
        Trainer(..., callbacks=[MovementPruningCallback(model, ...), DistillationCallback(model, teacher, 0.9, 2.0)])
    """

    def __init__(
        self, model: nn.Module, teacher: nn.Module, alpha: float = 0.5, temperature: float = 2.0,
        hidden_weight: float = 0.0, hidden_layers: str | list[int] = "all", match_layers: bool = False,
    ) -> None:
        check_distillation_values(alpha, temperature, hidden_weight, hidden_layers, match_layers)
        if teacher is model:
            raise ValueError("the teacher must be a separate model (a frozen copy), not the student itself")
        self.model = model
        self.teacher = teacher
        self.alpha = float(alpha)
        self.temperature = float(temperature)
        self.hidden_weight = float(hidden_weight)
        self.hidden_layers = hidden_layers
        self.match_layers = match_layers
        self.last_kd_loss: float | None = None
        self.last_hidden_loss: float | None = None
        self._handles: list[Any] = []
        self.teacher.eval()
        self.teacher.requires_grad_(False)

    def _select(self, kwargs: dict[str, Any], logits: torch.Tensor) -> torch.Tensor | None:
        for key, valid in (("labels", lambda t: t != -100), ("attention_mask", lambda t: t.bool())):
            value = kwargs.get(key)
            if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(logits.shape[:-1]):
                return valid(value)
        return None

    def _pre_hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> Any:
        """In training with ``β > 0``, ask the student for its hidden states."""
        if module.training and self.hidden_weight > 0:
            return args, {**kwargs, "output_hidden_states": True}
        return None

    def _hook(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if not module.training or (self.alpha == 0.0 and self.hidden_weight == 0.0):
            return None
        loss = output.get("loss") if isinstance(output, dict) else (output[0] if isinstance(output, tuple) else None)
        if loss is None:
            return None
        inputs = teacher_inputs(self.teacher, kwargs)
        if self.hidden_weight > 0:
            inputs["output_hidden_states"] = True
        with torch.no_grad():
            teacher_out = self.teacher(*args, **inputs)
        new_loss = loss
        if self.alpha > 0.0:
            new_loss = (1.0 - self.alpha) * loss + self.alpha * self._kd(kwargs, output, teacher_out).to(loss.dtype)
        if self.hidden_weight > 0:
            new_loss = new_loss + self.hidden_weight * self._hidden(kwargs, output, teacher_out).to(loss.dtype)
        if isinstance(output, dict):
            output["loss"] = new_loss
            return output
        return (new_loss, *output[1:])

    def _kd(self, kwargs: dict[str, Any], output: Any, teacher_out: Any) -> torch.Tensor:
        """The logits term: the mean over the logits-like outputs of ``T² · KL``."""
        student, teacher = logits_outputs(output), logits_outputs(teacher_out)
        missing = sorted(set(student) - set(teacher))
        if missing:
            raise ValueError(f"the teacher's output lacks the student's {missing} (teacher has {sorted(teacher)})")
        kd = torch.stack([
            distillation_loss(s, teacher[k], self.temperature, self._select(kwargs, s)) for k, s in student.items()
        ]).mean()
        self.last_kd_loss = float(kd.detach())
        return kd

    def _hidden(self, kwargs: dict[str, Any], output: Any, teacher_out: Any) -> torch.Tensor:
        """The hidden-state term ``mean_i MSE(h_s^{m(i)}, h_t^i)`` over the non-padding positions."""
        hidden = [o.get("hidden_states") if isinstance(o, dict) else None for o in (output, teacher_out)]
        if any(h is None for h in hidden):
            raise ValueError(
                "hidden-state distillation needs 'hidden_states' in the student's and the teacher's dict outputs "
                "(output_hidden_states=True); this model gives none"
            )
        mask = kwargs.get("attention_mask")
        select = mask.bool() if isinstance(mask, torch.Tensor) and mask.shape == hidden[1][1].shape[:-1] else None
        term = hidden_distillation_loss(hidden[0], hidden[1], self.hidden_layers, self.match_layers, select)
        self.last_hidden_loss = float(term.detach())
        return term

    def on_train_begin(self, args, state, control, **kwargs):
        self.teacher.to(args.device).eval()
        if not self._handles:
            self._handles = [
                self.model.register_forward_hook(self._hook, with_kwargs=True, prepend=True),
                self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            ]

    def on_train_end(self, args, state, control, **kwargs):
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or any(k.startswith("eval_") for k in logs):
            return
        if self.last_kd_loss is not None:
            logs["distill/kd_loss"] = self.last_kd_loss
        if self.last_hidden_loss is not None:
            logs["distill/hidden_loss"] = self.last_hidden_loss


def make_distillation_callback(
    model: nn.Module, cfg: dict[str, Any], init_from: str | None = None
) -> DistillationCallback:
    """From a recipe's ``distillation: {teacher, alpha, temperature, hidden_weight, hidden_layers, match_layers}``;
    ``teacher: init_from`` means the recipe's ``init_from`` model (the dense fine-tuned one)."""
    from prune_trainer.models import load_model_and_tokenizer

    check_distillation(cfg)
    teacher_src = cfg.get("teacher", "init_from")
    if teacher_src == "init_from":
        if not init_from:
            raise ValueError("distillation.teacher is 'init_from' but the recipe has no init_from")
        teacher_src = init_from
    try:
        teacher, _ = load_model_and_tokenizer(teacher_src)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"distillation.teacher: {err}") from err
    return DistillationCallback(model, teacher, **{k: v for k, v in cfg.items() if k != "teacher"})
