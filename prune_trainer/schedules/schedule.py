"""Sparsity schedules: target sparsity as a function of the optimizer step.

Cubic (Zhu & Gupta 2017, "To prune, or not to prune", eq. 1):
``s_t = s_f + (s_i - s_f) · (1 - (t - t_0) / (t_1 - t_0))³`` for ``t_0 ≤ t ≤ t_1``,
evaluated at pruning steps ``t_0 + kΔt``; linear replaces the cube by a power of 1; constant
holds ``s_f`` from ``t_0``; one-shot jumps from ``s_i`` to ``s_f`` at ``t_0``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from prune_trainer.masking.selection import check_sparsity, parse_pattern

SCHEDULE_KINDS = ("cubic", "linear", "constant", "oneshot")
SCOPES = ("global", "layer")


@dataclass
class PruningSchedule:
    """When and how much to prune.

    ``start_step``/``end_step``: an int is an optimizer step; a float in (0, 1] is a fraction of the
    run's total steps (resolved with `resolve`). ``end_step=None`` means the last step.
    ``frequency``: prune every that many steps between start and end (the Δt of Zhu & Gupta).
    ``scope``: ``"global"`` ranks weights across all target layers, ``"layer"`` within each layer.
    ``pattern``: ``"unstructured"`` or ``"N:M"`` (N:M masks are per layer and ignore the schedule's
    intermediate values: each pruning step applies the N:M pattern).
    """

    kind: str = "cubic"
    initial_sparsity: float = 0.0
    final_sparsity: float = 0.9
    start_step: int | float = 0
    end_step: int | float | None = None
    frequency: int = 100
    scope: str = "global"
    pattern: str = "unstructured"

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULE_KINDS:
            raise ValueError(f"unknown schedule kind {self.kind!r}; choose one of {SCHEDULE_KINDS}")
        if self.scope not in SCOPES:
            raise ValueError(f"unknown sparsity scope {self.scope!r}; choose one of {SCOPES}")
        check_sparsity(self.initial_sparsity, "initial_sparsity")
        check_sparsity(self.final_sparsity, "final_sparsity")
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"initial_sparsity {self.initial_sparsity} is above final_sparsity {self.final_sparsity}"
            )
        if not isinstance(self.frequency, int) or self.frequency < 1:
            raise ValueError(f"frequency must be a positive integer, got {self.frequency!r}")
        for field in ("start_step", "end_step"):
            value = getattr(self, field)
            if value is None and field == "end_step":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"{field} must be a non-negative int or a fraction in (0, 1], got {value!r}")
            if isinstance(value, float) and value > 1:
                raise ValueError(f"{field} as a float is a fraction of training and must be ≤ 1, got {value!r}")
        parse_pattern(self.pattern)

    def resolve(self, max_steps: int) -> PruningSchedule:
        """Copy with fractional/None start and end turned into absolute steps for a ``max_steps`` run."""

        def to_step(value: int | float | None) -> int:
            if value is None:
                return max_steps
            if isinstance(value, float):
                return int(round(value * max_steps))
            return int(value)

        start, end = to_step(self.start_step), to_step(self.end_step)
        if end < start:
            raise ValueError(f"end_step {end} is before start_step {start} (max_steps={max_steps})")
        return dataclasses.replace(self, start_step=start, end_step=end)

    def target(self, step: int) -> float:
        """Target sparsity at optimizer step ``step`` (needs resolved, integer start/end)."""
        t0, t1 = int(self.start_step), int(self.end_step if self.end_step is not None else self.start_step)
        si, sf = self.initial_sparsity, self.final_sparsity
        if self.kind == "constant":
            return sf if step >= t0 else 0.0
        if step < t0:
            return 0.0 if self.kind == "oneshot" else si
        if self.kind == "oneshot" or step >= t1 or t1 == t0:
            return sf
        # Only whole pruning intervals count, as in Zhu & Gupta: t = t0 + nΔt.
        t = t0 + ((step - t0) // self.frequency) * self.frequency
        if t == t0:
            return si
        progress = (t - t0) / (t1 - t0)
        power = 3 if self.kind == "cubic" else 1
        return sf + (si - sf) * (1.0 - progress) ** power

    def is_pruning_step(self, step: int) -> bool:
        """Whether masks are recomputed at ``step``: ``t0 ≤ step ≤ t1`` and on the Δt grid, or the end."""
        t0 = int(self.start_step)
        t1 = int(self.end_step if self.end_step is not None else t0)
        if self.kind in ("oneshot", "constant"):
            return step == t0
        if step < t0 or step > t1:
            return False
        return (step - t0) % self.frequency == 0 or step == t1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruningSchedule:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown schedule field(s) {sorted(unknown)}")
        return cls(**data)
