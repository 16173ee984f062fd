"""`SparsityLoggingCallback`: sparsity curves into the Trainer's logs (so into W&B, TensorBoard, ...)."""

from __future__ import annotations

from typing import Any

from transformers import Trainer, TrainerCallback

from prune_trainer.callbacks.base import PruningCallback
from prune_trainer.masking.sparsity import mask_sparsity


class SparsityLoggingCallback(TrainerCallback):
    """At every logging step add ``sparsity/global``, ``sparsity/target`` and ``sparsity/<layer>``.

    The Trainer calls its reporting integrations (`WandbCallback`, ...) before the callbacks a user passes,
    and each reads the ``logs`` dict in its own ``on_log``; so put this callback first with `install`::

        pruner = MagnitudePruningCallback(model, final_sparsity=0.9)
        trainer = Trainer(model=model, args=args, ..., callbacks=[pruner])
        SparsityLoggingCallback(pruner).install(trainer)   # ahead of the reporters

    Passed in ``callbacks=[...]`` instead, it still completes the Trainer's ``log_history`` (and every
    callback after it), but the reporters have already sent that step's row without the sparsity.

    Args:
        pruner: the pruning callback whose layers and target are logged.
        per_layer: also log each layer's sparsity.
    """

    def __init__(self, pruner: PruningCallback, per_layer: bool = True) -> None:
        if not isinstance(pruner, PruningCallback):
            raise TypeError(
                f"SparsityLoggingCallback takes the pruning callback (e.g. MagnitudePruningCallback), got "
                f"{type(pruner).__name__}"
            )
        self.pruner = pruner
        self.per_layer = per_layer

    def install(self, trainer: Trainer) -> SparsityLoggingCallback:
        """Put this callback first in ``trainer``'s callback list (before the reporting integrations)."""
        callbacks = trainer.callback_handler.callbacks
        if self in callbacks:
            callbacks.remove(self)
        callbacks.insert(0, self)
        return self

    def sparsity_logs(self) -> dict[str, float]:
        """The values added to the logs (also usable outside a Trainer)."""
        if not self.pruner.layers:
            return {}
        global_sparsity, per_layer = mask_sparsity(self.pruner.layers)
        logs = {"sparsity/global": global_sparsity, "sparsity/target": float(self.pruner.current_target)}
        if self.per_layer:
            logs.update({f"sparsity/{name}": value for name, value in per_layer.items()})
        return logs

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None, **kwargs: Any):
        if logs is None or any(k.startswith("eval_") for k in logs):
            return
        values = self.sparsity_logs()
        logs.update(values)
        # `Trainer.log` appended a copy of `logs` to the history before calling us: complete that row too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)
