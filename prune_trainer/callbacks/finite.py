"""`FiniteCheckCallback`: stop (or skip the step) when the loss or the gradients stop being finite.

The Trainer's ``logging_nan_inf_filter`` only hides a NaN loss from the logged average; the optimizer still
steps with NaN gradients and the run goes on to export a NaN model. This callback looks at what the optimizer is
about to use: before every optimizer step (``on_pre_optimizer_step``, after clipping) it checks that the total
gradient norm ``‖g‖₂`` over all parameters is finite, and that every loss the model returned since the last step
(a forward hook reads ``outputs.loss``) was finite.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

POLICIES = ("error", "skip")


class FiniteCheckCallback(TrainerCallback):
    """``on_nonfinite="error"``: raise `FloatingPointError` naming the optimizer step; ``"skip"``: zero that step's
    gradients and warn (the optimizer still steps, with zero gradients: momentum and weight decay apply, the bad
    batch contributes nothing). Skipped steps are listed in ``skipped_steps``."""

    def __init__(self, on_nonfinite: str = "error") -> None:
        if on_nonfinite not in POLICIES:
            raise ValueError(f"on_nonfinite must be one of {POLICIES}, got {on_nonfinite!r}")
        self.on_nonfinite = on_nonfinite
        self.skipped_steps: list[int] = []
        self._bad_loss: float | None = None
        self._hook: torch.utils.hooks.RemovableHandle | None = None

    def _record_loss(self, module: nn.Module, inputs: Any, outputs: Any) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else getattr(outputs, "loss", None)
        if isinstance(loss, torch.Tensor) and self._bad_loss is None and not bool(torch.isfinite(loss).all()):
            self._bad_loss = float(loss.detach().float().reshape(-1)[0])

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module = None, **kw
    ) -> None:
        if model is not None and self._hook is None:
            self._hook = model.register_forward_hook(self._record_loss)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kw) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_pre_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model: nn.Module = None, **kw
    ) -> None:
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        norms = [g.detach().float().norm() for g in grads]
        norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0  # ‖g‖₂ over all parameters
        bad_loss, self._bad_loss = self._bad_loss, None
        if math.isfinite(norm) and bad_loss is None:
            return
        step = state.global_step + 1  # the optimizer step about to be taken
        what = f"loss {bad_loss}" if bad_loss is not None else f"gradient norm {norm}"
        if self.on_nonfinite == "error":
            if self._hook is not None:
                self._hook.remove()
                self._hook = None
            raise FloatingPointError(
                f"non-finite {what} at optimizer step {step} (epoch {state.epoch or 0:.2f}): training stopped, "
                "nothing exported; lower the learning rate, enable max_grad_norm, or set on_nonfinite: skip"
            )
        for g in grads:
            g.zero_()
        self.skipped_steps.append(step)
        warnings.warn(f"non-finite {what} at optimizer step {step}: its gradients were zeroed", stacklevel=2)
