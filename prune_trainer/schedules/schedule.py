"""Sparsity schedules: target sparsity as a function of the optimizer step.

Cubic (Zhu & Gupta 2017, "To prune, or not to prune", eq. 1):
``s_t = s_f + (s_i - s_f) · (1 - (t - t_0) / (t_1 - t_0))³`` for ``t_0 ≤ t ≤ t_1``,
evaluated at pruning steps ``t_0 + kΔt``; linear replaces the cube by a power of 1; constant
holds ``s_f`` from ``t_0``; one-shot jumps from ``s_i`` to ``s_f`` at ``t_0``.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, Literal

from prune_trainer.masking.selection import check_sparsity
from prune_trainer.options import Options

ScheduleKind = Literal["cubic", "linear", "constant", "oneshot"]
SCHEDULE_KINDS: tuple[str, ...] = ("cubic", "linear", "constant", "oneshot")
MOVED_TO_CONFIG = ("scope", "pattern")


@dataclass
class PruningSchedule(Options):
    """When and how much to prune.

    ``start_step``/``end_step``: an int is an optimizer step; a float in [0, 1] is a fraction of the
    run's total steps (resolved with `resolve`). The default ``end_step=0.75`` leaves the last quarter of
    training to fine-tune the final mask; ``end_step=None`` means the last step (the final mask is then
    applied when training stops and never fine-tuned: a warning says so).
    ``frequency``: prune every that many steps between start and end (the Δt of Zhu & Gupta).
    """

    section = "pruning schedule"

    kind: ScheduleKind = "cubic"
    initial_sparsity: float = 0.0
    final_sparsity: float = 0.9
    start_step: int | float = 0
    end_step: int | float | None = 0.75
    frequency: int = 100

    def validate(self) -> None:
        check_sparsity(self.initial_sparsity, "initial_sparsity")
        check_sparsity(self.final_sparsity, "final_sparsity")
        if self.initial_sparsity > self.final_sparsity:
            raise ValueError(
                f"initial_sparsity {self.initial_sparsity} is above final_sparsity {self.final_sparsity}"
            )
        if self.frequency < 1:
            raise ValueError(f"frequency must be a positive integer, got {self.frequency!r}")
        for name in ("start_step", "end_step"):
            value = getattr(self, name)
            if value is None:
                continue
            if value < 0:
                raise ValueError(f"{name} must be a non-negative int or a fraction in [0, 1], got {value!r}")
            if isinstance(value, float) and value > 1:
                raise ValueError(f"{name} as a float is a fraction of training and must be ≤ 1, got {value!r}")
        ends = self.kind in ("cubic", "linear") and self.end_step is not None
        if ends and type(self.start_step) is type(self.end_step) and self.end_step < self.start_step:
            raise ValueError(f"end_step {self.end_step} is before start_step {self.start_step}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> PruningSchedule:
        moved = sorted(set(data or {}) & set(MOVED_TO_CONFIG))
        if moved:
            raise ValueError(
                f"pruning schedule: {moved} moved out of the schedule: set them on the pruning config "
                f"(pruning.{moved[0]}: ... in a recipe, PruningConfig({moved[0]}=...) in Python)"
            )
        return super().from_dict(data)

    def resolve(self, max_steps: int) -> PruningSchedule:
        """Copy with fractional/None start and end turned into absolute steps for a ``max_steps`` run.

        Errors when the end is before the start; warns when the start or end is past ``max_steps`` (the
        final target is not reached; the recipe runner makes this an error) or the final target is reached
        only at the last step (no fine-tuning of the final mask).
        """

        def to_step(value: int | float | None) -> int:
            if value is None:
                return max_steps
            if isinstance(value, float):
                return int(round(value * max_steps))
            return int(value)

        start, end = to_step(self.start_step), to_step(self.end_step)
        if self.kind in ("oneshot", "constant"):
            end = start
        if end < start:
            raise ValueError(f"end_step {end} is before start_step {start} (max_steps={max_steps})")
        if start > max_steps or end > max_steps:
            which = "end_step" if end > max_steps else "start_step"
            reached = dataclasses.replace(self, start_step=start, end_step=end).target(max_steps)
            warnings.warn(
                f"{which} {max(start, end)} is past the run's last step {max_steps}: the schedule reaches "
                f"{reached:.1%} instead of final_sparsity {self.final_sparsity:.1%} before training stops; lower it or "
                "give a fraction of training (e.g. end_step: 0.75)",
                stacklevel=2,
            )
        if self.kind in ("cubic", "linear") and end == max_steps and self.final_sparsity > self.initial_sparsity:
            warnings.warn(
                f"end_step {end} is the run's last step: the final mask ({self.final_sparsity:.0%}) is applied when "
                "training stops and is never fine-tuned; end earlier (e.g. end_step: 0.75) to leave training after it",
                stacklevel=2,
            )
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
