"""Method name → pruning callback class: the one place a method is registered (recipes and the CLI use it).

The callback class carries its options dataclass (``options_class``), so registering the class registers
the method's typed options too. Built-in methods are registered on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

if TYPE_CHECKING:
    from prune_trainer.callbacks.base import PruningCallback
    from prune_trainer.config import PruningConfig
    from prune_trainer.options import Options

PRUNING_CALLBACKS: dict[str, type[PruningCallback]] = {}


def _register_builtins() -> None:
    if PRUNING_CALLBACKS:
        return
    from prune_trainer.callbacks.fixed_mask import FixedMaskCallback
    from prune_trainer.callbacks.magnitude import MagnitudePruningCallback
    from prune_trainer.callbacks.movement import MovementPruningCallback
    from prune_trainer.callbacks.nm import NMSparsityCallback
    from prune_trainer.callbacks.obert import OBERTPruningCallback
    from prune_trainer.callbacks.structured import StructuredPruningCallback
    from prune_trainer.callbacks.structured_movement import StructuredMovementCallback
    from prune_trainer.callbacks.taylor import TaylorPruningCallback

    for cls in (
        MagnitudePruningCallback, MovementPruningCallback, NMSparsityCallback, OBERTPruningCallback,
        TaylorPruningCallback, StructuredPruningCallback, StructuredMovementCallback, FixedMaskCallback,
    ):
        PRUNING_CALLBACKS[cls.method_name] = cls


def register_method(cls: type[PruningCallback]) -> type[PruningCallback]:
    """Make ``cls`` available to recipes as ``method: <cls.method_name>``; usable as a class decorator.

    Registering a name twice is an error (no silent replacement of a method)."""
    from prune_trainer.callbacks.base import PruningCallback

    _register_builtins()
    if not (isinstance(cls, type) and issubclass(cls, PruningCallback)):
        raise TypeError(f"register_method needs a PruningCallback subclass, got {cls!r}")
    name = cls.method_name
    if not name:
        raise ValueError(f"{cls.__name__} has no method_name to register it under")
    if name in PRUNING_CALLBACKS:
        raise ValueError(f"pruning method {name!r} is already registered ({PRUNING_CALLBACKS[name].__name__})")
    PRUNING_CALLBACKS[name] = cls
    return cls


def pruning_callback_class(method: str) -> type[PruningCallback]:
    """The callback class of a registered method (clear error naming the known ones)."""
    _register_builtins()
    try:
        return PRUNING_CALLBACKS[method]
    except KeyError:
        raise ValueError(f"unknown pruning method {method!r}; known: {sorted(PRUNING_CALLBACKS)}") from None


def options_class(method: str) -> type[Options]:
    """The options dataclass of a registered method."""
    return pruning_callback_class(method).options_class


def make_pruning_callback(model: nn.Module, config: PruningConfig, **overrides) -> PruningCallback:
    """Instantiate the callback for ``config.method`` (clear error for an unknown name)."""
    return pruning_callback_class(config.method)(model, config, **overrides)
