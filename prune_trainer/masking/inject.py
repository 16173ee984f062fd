"""Inject `MaskedLinear` in place of the target `nn.Linear` modules of a model, and undo it.

Targets are chosen by regular expressions matched (``re.search``) against qualified module names,
like peft's ``target_modules``. The default (``targets=None``) is the preset of the model's family
(`prune_trainer.families.MODEL_FAMILIES`, by ``config.model_type``): every Linear inside the transformer blocks,
leaving the embeddings, pooler, classifier and LM head alone. GPT-2's `Conv1D` (weight stored ``[in, out]``) is
a target like a Linear and is wrapped as a `MaskedConv1D`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from prune_trainer.families import family_of, prunable_module_types, unknown_family_error
from prune_trainer.masking.masked_linear import MaskedConv1D, MaskedLinear

DEFAULT_EXCLUDE: tuple[str, ...] = (r"classifier", r"pooler", r"embeddings")
ADAPTER_MODULES = re.compile(r"(^|\.)lora_(A|B|embedding_A|embedding_B|magnitude_vector)(\.|$)")
"""PEFT LoRA adapter modules: never pruning targets, whatever the patterns (the masks go on the base weights,
``...base_layer``; see `prune_trainer.llm.lora`)."""


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def resolve_targets(
    model: nn.Module, targets: Sequence[str] | None = None, exclude: Sequence[str] | None = DEFAULT_EXCLUDE
) -> tuple[list[str], list[str]]:
    """``(targets, exclude)`` regexes: the given ones, or (``targets=None``) the preset of the model's family with
    its own exclusions added; ``exclude=None`` means `DEFAULT_EXCLUDE`.

    Raises:
        ValueError: ``targets`` is None and the model's ``model_type`` has no preset (the message lists its Linears).
    """
    exclude = list(DEFAULT_EXCLUDE if exclude is None else exclude)
    if targets is not None:
        return list(targets), exclude
    family = family_of(model)
    if family is None:
        raise unknown_family_error(model)
    return list(family.targets), exclude + [e for e in family.exclude if e not in exclude]


def in_features(module: nn.Module) -> int:
    """Input size of a Linear (``in_features``) or of a `Conv1D` (weight ``[in, out]``: ``weight.shape[0]``)."""
    return module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]


def find_target_linears(
    model: nn.Module,
    targets: Sequence[str] | None = None,
    exclude: Sequence[str] | None = DEFAULT_EXCLUDE,
) -> list[str]:
    """Names of the `nn.Linear` (and `Conv1D`) modules matching any of ``targets`` and none of ``exclude``
    (``targets=None``: the family preset, see `resolve_targets`); PEFT adapter modules (`ADAPTER_MODULES`) are
    always left out.

    Raises:
        ValueError: if a pattern is not a valid regex, the patterns match no Linear layer, or ``targets`` is None
            for a model of an unknown family.
    """
    targets, exclude = resolve_targets(model, targets, exclude)
    kinds = prunable_module_types()
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
        if isinstance(module, kinds)
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
    targets: Sequence[str] | None = None,
    exclude: Sequence[str] | None = DEFAULT_EXCLUDE,
    mask_in_forward: bool = False,
) -> dict[str, MaskedLinear]:
    """Replace each target Linear by a `MaskedLinear` sharing its parameters (a `Conv1D` by a `MaskedConv1D`);
    return them by name. ``targets=None``: the preset of the model's family (`resolve_targets`).

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
        wrapper = MaskedLinear if isinstance(linear, nn.Linear) else MaskedConv1D
        masked = wrapper.from_linear(linear, mask_in_forward=mask_in_forward)
        _set_submodule(model, name, masked)
        layers[name] = masked
    return layers


def masked_layers(model: nn.Module) -> dict[str, MaskedLinear]:
    """All `MaskedLinear` modules of ``model`` by qualified name (empty if none was injected)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, MaskedLinear)}


def unwrap_masked_layers(model: nn.Module) -> nn.Module:
    """Replace every `MaskedLinear` by a plain `nn.Linear` (a `MaskedConv1D` by a `Conv1D`) with ``W ⊙ M`` baked
    in (in place)."""
    for name, layer in list(masked_layers(model).items()):
        _set_submodule(model, name, layer.unwrap())
    return model
