"""`FixedMaskCallback`: train with a given mask held fixed, from given weights (one round of a lottery ticket run).

Constructed on the model, it loads the weights of ``options.weights`` (a safetensors state dict: the rewind point
of IMP, Frankle & Carbin 2019) into every parameter and installs the keep-masks of ``options.masks`` (pruned
weights become exactly zero and stay so through every optimizer step, as with every method). Training then never
changes the mask. ``masks: zeros`` keeps exactly the nonzero pattern of the start model's target weights
(``keep = W ≠ 0`` for every target Linear, taken when the callback is constructed, after ``weights`` is loaded):
fine-tuning a one-shot export (SparseGPT, Wanda, 2:4 ...) with its mask fixed, so the export keeps its sparsity
pattern. With ``save_weights_step: K`` and ``save_weights_to: <file>`` it saves the weights after ``K`` optimizer
steps (``K = 0``: before the first step), atomically: the rewind point of late resetting.

On a resume the Trainer's checkpoint replaces the weights and masks loaded here (they are the model's tensors and
buffers), so a resumed round continues where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerControl, TrainerState, TrainingArguments

from prune_trainer.callbacks.base import PruningCallback, PruningContext
from prune_trainer.io import atomic_file
from prune_trainer.options import Options

MASK_SUFFIX = ".weight_mask"
ZEROS = "zeros"
"""``masks: zeros``: the keep-mask of every target Linear is its start weight's nonzero pattern."""


@dataclass
class FixedMaskOptions(Options):
    """``masks``: safetensors file of keep-masks ``{layer name: [out, in]}``, or ``zeros`` (keep the start model's
    nonzero weights, ``W ≠ 0``), or null (keep every weight).
    ``weights``: safetensors state dict loaded into the model before training (null: the model's own).
    ``save_weights_step`` / ``save_weights_to``: save the weights after that many optimizer steps to that file."""

    section = "fixed_mask options"

    masks: str | None = None
    weights: str | None = None
    save_weights_step: int | None = None
    save_weights_to: str | None = None

    def validate(self) -> None:
        if (self.save_weights_step is None) != (self.save_weights_to is None):
            raise ValueError("fixed_mask options: save_weights_step and save_weights_to go together")
        if self.save_weights_step is not None and self.save_weights_step < 0:
            raise ValueError(f"fixed_mask options: save_weights_step must be >= 0, got {self.save_weights_step}")


def model_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict without the mask buffers, as contiguous CPU copies (safetensors-ready)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
            if not k.endswith(MASK_SUFFIX)}


def save_weights(model: nn.Module, path: str | Path) -> None:
    """`model_weights` to a safetensors file, atomically."""
    with atomic_file(path) as tmp:
        save_file(model_weights(model), str(tmp))


def _read(path: str, what: str) -> dict[str, torch.Tensor]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"fixed_mask options: {what} file {path!r} does not exist")
    return load_file(path)


class FixedMaskCallback(PruningCallback):
    """Hold the masks of ``options.masks`` fixed through training, starting from ``options.weights``.

    Example::

        pruner = FixedMaskCallback(model, masks="masks.safetensors", weights="rewind.safetensors")
        Trainer(model=model, args=args, ..., callbacks=[pruner]).train()
    """

    method_name = "fixed_mask"
    options_class = FixedMaskOptions

    def __init__(self, model: nn.Module, *args: Any, **kwargs: Any) -> None:
        super().__init__(model, *args, **kwargs)
        opts = self.options
        if opts.weights is not None:
            self._load_weights(_read(opts.weights, "weights"))
        shapes = {n: tuple(layer.weight.shape) for n, layer in self.layers.items()}
        if opts.masks == ZEROS:
            self.masks = {n: layer.weight.detach() != 0 for n, layer in self.layers.items()}
        elif opts.masks is not None:
            self.masks = {n: m.bool() for n, m in _read(opts.masks, "masks").items()}
            found = {n: tuple(m.shape) for n, m in self.masks.items()}
            if found != shapes:
                bad = sorted(set(found) ^ set(shapes)) or [n for n in shapes if found[n] != shapes[n]]
                raise ValueError(f"{opts.masks}: the masks do not match the target layers (names or shapes): {bad[:3]}")
        else:
            self.masks = {n: torch.ones(s, dtype=torch.bool) for n, s in shapes.items()}
        for name, mask in self.masks.items():
            self.layers[name].set_mask(mask)
        self.current_target = self.sparsity()[0]

    @torch.no_grad()
    def _load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Copy every tensor of ``state`` into the model; names must match the model's (masks aside)."""
        result = self.model.load_state_dict(state, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith(MASK_SUFFIX)]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"{self.options.weights}: the weights do not match the model (missing {missing[:3]}, unexpected "
                f"{result.unexpected_keys[:3]})"
            )

    def compute_masks(self, step: int, target: float, context: PruningContext) -> dict[str, torch.Tensor]:
        return self.masks

    def should_prune(self, step: int) -> bool:
        return False  # the mask is fixed

    def _maybe_save(self, state: TrainerState) -> None:
        if self.options.save_weights_step == state.global_step and state.is_world_process_zero:
            save_weights(self.model, self.options.save_weights_to)

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if state.global_step == 0:
            self._maybe_save(state)

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        self._maybe_save(state)

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs):
        pass  # no final pruning step: the mask is fixed
