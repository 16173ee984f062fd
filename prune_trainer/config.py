"""`PruningConfig`: what to prune, with which method and schedule; round-trips to YAML."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prune_trainer.masking.inject import DEFAULT_EXCLUDE, DEFAULT_TARGETS
from prune_trainer.schedules.schedule import PruningSchedule
from prune_trainer.yaml_io import load_yaml


@dataclass
class PruningConfig:
    """Pruning settings shared by every method.

    ``targets``/``exclude``: regexes over module names (see `inject_masked_layers`).
    ``min_kept_fraction``: per-layer floor of kept weights under global scope (no layer emptied).
    ``method_kwargs``: method-specific options (e.g. movement's score learning rate).
    """

    method: str = "magnitude"
    schedule: PruningSchedule = field(default_factory=PruningSchedule)
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_EXCLUDE))
    min_kept_fraction: float = 0.01
    method_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.schedule, dict):
            self.schedule = PruningSchedule.from_dict(self.schedule)
        if not 0.0 <= self.min_kept_fraction < 1.0:
            raise ValueError(f"min_kept_fraction must be in [0, 1), got {self.min_kept_fraction!r}")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["schedule"] = self.schedule.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningConfig:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown pruning config field(s) {sorted(unknown)}")
        return cls(**data)

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
