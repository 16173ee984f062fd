"""`PruningConfig`: what to prune, with which method, pattern, scope and schedule; round-trips to YAML.

A recipe's ``pruning:`` block is this dataclass::

    pruning:
      method: movement            # a registered method (see `prune_trainer.callbacks.registry`)
      schedule: {kind: cubic, final_sparsity: 0.9, start_step: 0.1, end_step: 0.7, frequency: 100}
      scope: global               # one threshold across layers, or "layer": each layer at the target
      pattern: unstructured       # or "N:M", e.g. "2:4"
      targets: null               # the model family's preset (prune_trainer.families), or a list of regexes
      exclude: [classifier, pooler, embeddings]
      min_kept_fraction: 0.01
      options: {variant: soft, final_lambda: 100}   # the method's typed options (e.g. `MovementOptions`)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from prune_trainer.masking.inject import DEFAULT_EXCLUDE
from prune_trainer.masking.selection import parse_pattern
from prune_trainer.options import Options, unknown_key_error
from prune_trainer.schedules.schedule import PruningSchedule
from prune_trainer.yaml_io import load_yaml

Scope = Literal["global", "layer"]


@dataclass
class PruningConfig(Options):
    """Pruning settings shared by every method.

    ``targets``/``exclude``: regexes over module names (see `inject_masked_layers`); ``targets=None`` (default):
    every Linear inside the transformer blocks of the model's family (`prune_trainer.families.MODEL_FAMILIES`).
    ``scope``: ``"global"`` ranks weights across all target layers, ``"layer"`` within each layer.
    ``pattern``: ``"unstructured"`` or ``"N:M"`` (N:M masks are per layer; the pattern fixes the sparsity).
    ``min_kept_fraction``: per-layer floor of kept weights under global scope (no layer emptied).
    ``options``: the method's options dataclass (``None`` = the method's defaults); a dict is converted.
    """

    section = "pruning"

    method: str = "magnitude"
    schedule: PruningSchedule = field(default_factory=PruningSchedule)
    scope: Scope = "global"
    pattern: str = "unstructured"
    targets: list[str] | None = None
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    min_kept_fraction: float = 0.01
    options: Options | None = None

    def __post_init__(self) -> None:
        if isinstance(self.schedule, dict):
            self.schedule = PruningSchedule.from_dict(self.schedule)
        for name in ("targets", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise ValueError(
                    f"pruning.{name} must be a list of regexes, got the string {value!r} "
                    f"(write {name}: [{value!r}])"
                )
        if isinstance(self.pattern, int):
            parse_pattern(self.pattern)  # the message explains YAML's base-60 reading of 2:4
        if not isinstance(self.schedule, PruningSchedule):
            raise ValueError(f"pruning.schedule must be a mapping or a PruningSchedule, got {self.schedule!r}")
        if not isinstance(self.method, str):
            raise ValueError(f"pruning.method must be a method name, got {self.method!r}")
        from prune_trainer.callbacks.registry import options_class

        cls = options_class(self.method)  # unknown method: error naming the known ones
        if self.options is None or isinstance(self.options, dict):
            self.options = cls.from_dict(self.options)
        elif not isinstance(self.options, cls):
            raise ValueError(
                f"pruning.options for method {self.method!r} must be {cls.__name__}, got {type(self.options).__name__}"
            )
        super().__post_init__()

    def validate(self) -> None:
        if not 0.0 <= self.min_kept_fraction < 1.0:
            raise ValueError(f"min_kept_fraction must be in [0, 1), got {self.min_kept_fraction!r}")
        parse_pattern(self.pattern)

    @property
    def nm(self) -> tuple[int, int] | None:
        """``(N, M)`` for an N:M pattern, None for unstructured."""
        return parse_pattern(self.pattern)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PruningConfig:
        if isinstance(data, dict) and "method_kwargs" in data:
            raise ValueError("pruning.method_kwargs is now pruning.options (the method's typed options)")
        return super().from_dict(data)

    def to_dict(self) -> dict[str, Any]:
        data = super().to_dict()
        data["schedule"] = self.schedule.to_dict()
        return data

    def with_overrides(self, **overrides: Any) -> PruningConfig:
        """A copy with keyword overrides routed by name: schedule fields (``final_sparsity=0.9``), config
        fields (``scope="layer"``) or the method's option fields (``variant="soft"``); others are an error."""
        schedule_names = set(PruningSchedule.field_names())
        option_names = set(self.options.field_names()) if self.options is not None else set()
        config_names = set(self.field_names()) - {"schedule", "options", "method"}
        sched = {k: v for k, v in overrides.items() if k in schedule_names}
        opts = {k: v for k, v in overrides.items() if k in option_names and k not in schedule_names}
        conf = {k: v for k, v in overrides.items() if k in config_names}
        unknown = set(overrides) - set(sched) - set(opts) - set(conf)
        if unknown:
            raise unknown_key_error(f"{self.method} pruning", unknown, schedule_names | option_names | config_names)
        return dataclasses.replace(
            self,
            schedule=self.schedule.replace(**sched) if sched else self.schedule,
            options=self.options.replace(**opts) if opts else self.options,
            **conf,
        )

    def to_yaml(self, path: str | Path | None = None) -> str:
        text = yaml.safe_dump(self.to_dict(), sort_keys=False)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> PruningConfig:
        path = Path(text_or_path)
        text = path.read_text() if path.suffix in (".yaml", ".yml") and path.is_file() else str(text_or_path)
        return cls.from_dict(load_yaml(text) or {})
