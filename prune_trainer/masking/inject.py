"""Inject `MaskedLinear` in place of the target `nn.Linear` modules of a model, and undo it.

Targets are chosen by regular expressions matched (``re.search``) against qualified module names,
like peft's ``target_modules``. The default covers every Linear inside the transformer blocks of
BERT-style encoders (attention query/key/value/output, FFN intermediate/output) and leaves the
embeddings, pooler and classifier alone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from prune_trainer.masking.masked_linear import MaskedLinear

DEFAULT_TARGETS: tuple[str, ...] = (r"(encoder|transformer)\.layers?\.\d+\.",)
DEFAULT_EXCLUDE: tuple[str, ...] = (r"classifier", r"pooler", r"embeddings")
ADAPTER_MODULES = re.compile(r"(^|\.)lora_(A|B|embedding_A|embedding_B|magnitude_vector)(\.|$)")
"""PEFT LoRA adapter modules: never pruning targets, whatever the patterns (the masks go on the base weights,
``...base_layer``; see `prune_trainer.llm.lora`)."""


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def find_target_linears(
    model: nn.Module,
    targets: Sequence[str] = DEFAULT_TARGETS,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> list[str]:
    """Names of the `nn.Linear` modules matching any of ``targets`` and none of ``exclude`` (PEFT adapter
    modules, `ADAPTER_MODULES`, are always left out).

    Raises:
        ValueError: if a pattern is not a valid regex or the patterns match no Linear layer.
    """
    compiled = []
    for pattern in [*targets, *exclude]:
        try:
            compiled.append(re.compile(pattern))
        except re.error as err:
            raise ValueError(f"invalid target pattern {pattern!r}: {err}") from err
    target_res, exclude_res = compiled[: len(targets)], compiled[len(targets) :]
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and any(r.search(name) for r in target_res)
        and not any(r.search(name) for r in exclude_res)
        and not ADAPTER_MODULES.search(name)
    ]
    if not names:
        raise ValueError(
            f"target patterns {list(targets)} (exclude {list(exclude)}) match no nn.Linear layer of "
            f"{type(model).__name__}"
        )
    return names


def inject_masked_layers(
    model: nn.Module,
    targets: Sequence[str] = DEFAULT_TARGETS,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
    mask_in_forward: bool = False,
) -> dict[str, MaskedLinear]:
    """Replace each target Linear by a `MaskedLinear` sharing its parameters; return them by name.

    Idempotent: layers that are already `MaskedLinear` are returned as they are (with ``mask_in_forward``
    switched on if asked), so several callbacks on one model share one set of masks.
    """
    existing = masked_layers(model)
    if existing:
        for layer in existing.values():
            layer.mask_in_forward = layer.mask_in_forward or mask_in_forward
        return existing
    layers: dict[str, MaskedLinear] = {}
    for name in find_target_linears(model, targets, exclude):
        linear = model.get_submodule(name)
        masked = MaskedLinear.from_linear(linear, mask_in_forward=mask_in_forward)
        _set_submodule(model, name, masked)
        layers[name] = masked
    return layers


def masked_layers(model: nn.Module) -> dict[str, MaskedLinear]:
    """All `MaskedLinear` modules of ``model`` by qualified name (empty if none was injected)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MaskedLinear)}


def unwrap_masked_layers(model: nn.Module) -> nn.Module:
    """Replace every `MaskedLinear` by a plain `nn.Linear` with ``W ⊙ M`` baked in (in place)."""
    for name, layer in list(masked_layers(model).items()):
        _set_submodule(model, name, layer.to_linear())
    return model
