"""`SparsityLoggingCallback`: sparsity curves into the Trainer's logs (so into W&B, TensorBoard, ...)."""

from __future__ import annotations

import inspect

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import CallbackHandler

from prune_trainer.masking.inject import masked_layers
from prune_trainer.masking.sparsity import mask_sparsity


class SparsityLoggingCallback(TrainerCallback):
    """At every logging step add ``sparsity/global``, ``sparsity/target`` and ``sparsity/<layer>``.

    The reporting integrations (`WandbCallback`, ...) come before user callbacks in the Trainer's
    list, and they read the ``logs`` dict when their own ``on_log`` runs; so when the Trainer is
    built this callback moves itself to the front of the list, ahead of the reporters.

    Args:
        model: the pruned model (after a pruning callback wrapped it).
        per_layer: also log each layer's sparsity.
    """

    def __init__(self, model: nn.Module, per_layer: bool = True) -> None:
        self.model = model
        self.per_layer = per_layer
        self._moved = False

    def on_init_end(self, args, state, control, **kwargs):
        self._move_before_reporters()

    def on_train_begin(self, args, state, control, **kwargs):
        self._move_before_reporters()

    def _move_before_reporters(self) -> None:
        if self._moved:
            return
        frame = inspect.currentframe()
        try:
            caller = frame.f_back.f_back if frame and frame.f_back else None
            handler = caller.f_locals.get("self") if caller is not None else None
            if isinstance(handler, CallbackHandler) and self in handler.callbacks:
                handler.callbacks.remove(self)
                handler.callbacks.insert(0, self)
                self._moved = True
        finally:
            del frame

    def sparsity_logs(self) -> dict[str, float]:
        """The values added to the logs (also usable outside a Trainer)."""
        layers = masked_layers(self.model)
        if not layers:
            return {}
        global_sparsity, per_layer = mask_sparsity(layers)
        logs = {"sparsity/global": global_sparsity}
        target = getattr(self.model, "_prune_trainer_target", None)
        if target is not None:
            logs["sparsity/target"] = float(target)
        if self.per_layer:
            logs.update({f"sparsity/{name}": value for name, value in per_layer.items()})
        return logs

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or any(k.startswith("eval_") for k in logs):
            return
        values = self.sparsity_logs()
        logs.update(values)
        # `Trainer.log` appended a copy of `logs` to the history before calling us: complete that row too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)
