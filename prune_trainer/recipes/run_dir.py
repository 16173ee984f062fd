"""The state of a run's output folder: done or not, its checkpoints, its identity, its lock, its carried totals.

- done: ``metrics.json`` exists and parses (the runner writes it last, atomically);
- checkpoints: ``checkpoint-<step>`` folders, usable only when complete (a kill during a save leaves a partial one);
- identity: ``run_config.json``, the resolved recipe, saved at the start and compared on every resume;
- lock: ``.lock`` (created with ``O_CREAT | O_EXCL``, holding the pid): one run at a time per folder;
- totals: ``run_state.json`` in each checkpoint carries the loss sum and wall time of the parts before it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from prune_trainer.export.export import has_model_weights
from prune_trainer.io import RunInProgressError, atomic_write_json, exclusive_lock

__all__ = [
    "RunInProgressError", "RunStateCallback", "check_run_identity", "diff_keys", "exclusive_lock",
    "incomplete_checkpoints", "last_checkpoint_step", "run_is_complete",
]

METRICS_FILE = "metrics.json"
RUN_CONFIG_FILE = "run_config.json"
RUN_STATE_FILE = "run_state.json"
TRAINER_STATE_FILE = "trainer_state.json"
PRUNING_STATE_FILE = "pruning_state.json"


def _read_json(path: Path) -> Any:
    """Parsed JSON of ``path``, or None when it is missing or does not parse."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run_is_complete(out_dir: str | os.PathLike) -> bool:
    """A run is done when its ``metrics.json`` (written last) exists and parses as a mapping."""
    return isinstance(_read_json(Path(out_dir) / METRICS_FILE), dict)


def checkpoint_problem(ckpt: Path, pruned: bool = False) -> str | None:
    """Why checkpoint folder ``ckpt`` cannot be resumed from (None when complete): ``trainer_state.json`` parses,
    model weights are present, and ``pruning_state.json`` parses when ``pruned``. (The runner's
    ``run_state.json`` is not required: checkpoints of older versions lack it and stay resumable.)"""
    needed = [TRAINER_STATE_FILE] + ([PRUNING_STATE_FILE] if pruned else [])
    for name in needed:
        if _read_json(ckpt / name) is None:
            return f"{name} missing or unreadable"
    if not has_model_weights(ckpt):
        return "no model weights"
    return None


def _checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """``(step, folder)`` of every ``checkpoint-<step>`` folder, newest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [
        (int(p.name.split("-", 1)[1]), p)
        for p in ckpt_dir.iterdir()
        if p.is_dir() and p.name.startswith("checkpoint-") and p.name.split("-", 1)[1].isdigit()
    ]
    return sorted(found, reverse=True)


def incomplete_checkpoints(ckpt_dir: str | os.PathLike, pruned: bool = False) -> list[tuple[Path, str]]:
    """Every incomplete checkpoint folder in ``ckpt_dir`` with the reason (see `checkpoint_problem`)."""
    found = ((p, checkpoint_problem(p, pruned)) for _, p in _checkpoints(Path(ckpt_dir)))
    return [(p, why) for p, why in found if why is not None]


def last_checkpoint_step(
    ckpt_dir: str | os.PathLike, pruned: bool = False, log: Callable[[str], None] | None = print
) -> int | None:
    """Global step of the newest complete ``checkpoint-<step>`` in ``ckpt_dir`` (None when there is none).

    Newer incomplete ones (a kill during a save) are skipped, each named through ``log``."""
    for step, path in _checkpoints(Path(ckpt_dir)):
        why = checkpoint_problem(path, pruned)
        if why is None:
            return step
        if log is not None:
            log(f"skipping incomplete checkpoint {path} ({why})")
    return None


def diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings (a key present on one side only counts)."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new), key=str)
        return [d for k in keys for d in diff_keys(old.get(k), new.get(k), f"{prefix}{k}.")]
    return [] if old == new else [prefix.rstrip(".") or "<root>"]


def check_run_identity(out_dir: Path, resolved: dict[str, Any]) -> None:
    """Save ``resolved`` as ``run_config.json`` on a first start; on a resume raise ValueError if it changed."""
    path = out_dir / RUN_CONFIG_FILE
    saved = _read_json(path)
    current = json.loads(json.dumps(resolved, default=str))  # the form it takes on disk
    if saved is not None:
        changed = diff_keys(saved, current)
        if changed:
            raise ValueError(
                f"{out_dir} holds a run of a different recipe (changed: {', '.join(changed)}); "
                "resume it with the same recipe, or pass --overwrite (run_recipe(..., overwrite=True)) to delete "
                "it and start over"
            )
        return
    atomic_write_json(path, current)


class RunStateCallback(TrainerCallback):
    """Writes ``run_state.json`` into each checkpoint (atomically, after the Trainer's files): the sum of the
    training losses and the wall time of the whole run up to that step, so a resumed run reports whole-run
    totals: ``train_loss = Σ loss / steps``, ``wall_time_s = Σ parts``.

    ``carried`` is the ``run_state.json`` of the checkpoint resumed from; `attach` gives it the Trainer, whose
    running loss sum (``_total_loss_scalar + _tr_loss``) it reads."""

    def __init__(self, carried: dict[str, Any] | None = None, start: float | None = None) -> None:
        self.carried = {"train_loss_sum": 0.0, "wall_time_s": 0.0, **(carried or {})}
        self.start = time.time() if start is None else start
        self.trainer: Any = None

    @classmethod
    def from_checkpoint(
        cls, ckpt: Path | None, start: float | None = None, log: Callable[[str], None] = print
    ) -> RunStateCallback:
        """Carry the totals of checkpoint ``ckpt`` (None: a fresh run)."""
        carried = _read_json(ckpt / RUN_STATE_FILE) if ckpt is not None else None
        if ckpt is not None and not isinstance(carried, dict):
            log(f"note: {ckpt} has no {RUN_STATE_FILE} (an older version wrote it): train_loss and wall_time_s "
                "cover only the steps after it")
            carried = None
        return cls(carried, start)

    def attach(self, trainer: Any) -> RunStateCallback:
        self.trainer = trainer
        return self

    def part_loss_sum(self) -> float:
        """Sum of the per-step training losses of this process's part of the run so far."""
        tr_loss = getattr(self.trainer, "_tr_loss", None)
        return float(getattr(self.trainer, "_total_loss_scalar", 0.0)) + (
            float(tr_loss.item()) if tr_loss is not None else 0.0
        )

    def totals(self, part_loss_sum: float) -> dict[str, float]:
        """Whole-run loss sum and wall time: the carried ones plus this part's."""
        return {
            "train_loss_sum": self.carried["train_loss_sum"] + part_loss_sum,
            "wall_time_s": self.carried["wall_time_s"] + time.time() - self.start,
        }

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            atomic_write_json(ckpt / RUN_STATE_FILE, {"global_step": state.global_step,
                                                      **self.totals(self.part_loss_sum())})
