"""Lottery tickets from a recipe: iterative magnitude pruning with rewinding, and its two controls.

``run_lottery(recipe, rounds=R, rate=p, rewind="pretrained" | "step:K")`` (``prune-trainer lottery``):

- round 0 trains the recipe densely and saves the rewind point ``θ_K``: the weights before the first step
  (``pretrained``: the pre-trained encoder and the initial head, Chen et al. 2020) or after ``K`` steps
  (``step:K``, late resetting, Frankle et al. 2019);
- before round ``r ≥ 1`` the masks keep the largest ``|W|`` of round ``r−1``'s surviving weights, for a sparsity
  ``s_r = 1 − (1 − p)^r`` (`imp_masks`; ``scope`` global or per layer; the masks nest);
- round ``r`` trains from ``θ_K`` with those masks fixed (`FixedMaskCallback`), the recipe's full budget.

``control="random-reinit"`` trains each round's lottery masks from a random re-initialisation of the pruned
Linears; ``control="random-mask"`` trains random masks with each round's per-layer sparsity from ``θ_K``; both
with the same budget, after the lottery has written its masks.

Layout of ``<results>/<name>/``: ``run_config.json`` (the lottery's identity: recipe, rate, rewind, scope; a
restart with other values is an error), ``rewind.safetensors``, ``masks/round_<r>.safetensors``, ``round_<r>/``
(a complete recipe run each: ``metrics.json``, ``model/``, checkpoints while it runs), ``summary.json`` (every
round's F1 and sparsity, rewritten atomically after each round) and ``control_<kind>/`` with the same shape.
A restart skips complete rounds and resumes the current one from its newest checkpoint; ``rounds`` may grow.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import load_file, save_file

from prune_trainer.io import atomic_file, atomic_write_json, exclusive_lock
from prune_trainer.methods.lottery import compounded_sparsity, imp_masks, random_masks_like, reinit_linears
from prune_trainer.options import Options
from prune_trainer.recipes.recipe import Recipe
from prune_trainer.recipes.run_dir import (
    METRICS_FILE,
    RUN_CONFIG_FILE,
    check_run_identity,
    diff_keys,
    run_is_complete,
)


@dataclass
class LotteryConfig(Options):
    """``rounds`` of pruning after the dense round 0; ``rate`` p in (0, 1): the fraction of the remaining
    weights pruned each round; ``rewind``: ``pretrained`` or ``step:K`` (an optimizer step of round 0);
    ``scope``: ``global`` or ``layer``; ``control``: ``none`` (the lottery itself), ``random-reinit`` or
    ``random-mask``; ``seed``: of the controls' random draws."""

    section = "lottery"

    rounds: int = 3
    rate: float = 0.2
    rewind: str = "pretrained"
    scope: Literal["global", "layer"] = "global"
    control: Literal["none", "random-reinit", "random-mask"] = "none"
    seed: int = 0

    def validate(self) -> None:
        if self.rounds < 1:
            raise ValueError(f"lottery: rounds must be at least 1, got {self.rounds!r}")
        if not 0.0 < self.rate < 1.0:
            raise ValueError(
                f"lottery: rate must be in (0, 1) (the fraction of the remaining weights pruned each round), "
                f"got {self.rate!r}"
            )
        _ = self.rewind_step

    @property
    def rewind_step(self) -> int:
        """The optimizer step of round 0 whose weights are the rewind point (0 for ``pretrained``)."""
        if self.rewind == "pretrained":
            return 0
        match = re.fullmatch(r"step:(\d+)", self.rewind)
        if match is None:
            raise ValueError(
                f"lottery: rewind must be 'pretrained' or 'step:K' (K an optimizer step of the first round), "
                f"got {self.rewind!r}"
            )
        return int(match.group(1))


@dataclass(frozen=True)
class LotteryPaths:
    """Where a lottery run keeps its files (see the module docstring)."""

    root: Path

    @property
    def rewind(self) -> Path:
        return self.root / "rewind.safetensors"

    def masks(self, r: int, control: str = "none") -> Path:
        return self.out(control) / "masks" / f"round_{r}.safetensors"

    def out(self, control: str = "none") -> Path:
        return self.root if control == "none" else self.root / f"control_{control}"

    def round_dir(self, r: int, control: str = "none") -> Path:
        return self.out(control) / f"round_{r}"


def round_recipe(recipe: Recipe, out_dir: Path, options: dict[str, Any]) -> Recipe:
    """The recipe of one round: the lottery recipe's training, a `FixedMaskCallback` with ``options``, written to
    ``out_dir``; the target layers are the recipe's ``pruning.targets`` / ``exclude`` when it has a pruning block."""
    pruning = {"method": "fixed_mask", "schedule": {"kind": "constant", "final_sparsity": 0.0}, "options": options}
    for key in ("targets", "exclude"):
        if recipe.pruning and key in recipe.pruning:
            pruning[key] = recipe.pruning[key]
    name = f"{recipe.name}_{out_dir.parent.name}_{out_dir.name}" if out_dir.parent.name.startswith("control_") \
        else f"{recipe.name}_{out_dir.name}"
    out = dataclasses.replace(recipe, name=name, output_dir=str(out_dir), pruning=pruning)
    out.validate()
    return out


def _identity(recipe: Recipe, config: LotteryConfig) -> dict[str, Any]:
    """What a lottery run's results depend on (``rounds`` excluded: a finished run may be extended)."""
    ident = {"recipe": {k: v for k, v in recipe.to_dict().items() if k != "description"},
             "rate": config.rate, "rewind": config.rewind, "scope": config.scope}
    if config.control != "none":
        ident.update(control=config.control, seed=config.seed)
    return json.loads(json.dumps(ident, default=str))


def _check_lottery_for_control(recipe: Recipe, config: LotteryConfig, paths: LotteryPaths) -> None:
    """A control needs the lottery's rewind point and masks of every round, from the same recipe and settings."""
    saved = paths.root / RUN_CONFIG_FILE
    lottery = dataclasses.replace(config, control="none")
    if not saved.is_file():
        raise FileNotFoundError(f"control {config.control!r} needs the lottery run in {paths.root}: run it first "
                                f"(the same command without --control)")
    changed = diff_keys(json.loads(saved.read_text()), _identity(recipe, lottery))
    if changed:
        raise ValueError(f"{paths.root} holds a lottery with other settings (changed: {', '.join(changed)})")
    needed = [paths.rewind] + [paths.masks(r) for r in range(1, config.rounds + 1)]
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"control {config.control!r} with {config.rounds} rounds needs {', '.join(missing[:3])}: run the lottery "
            f"to round {config.rounds} first"
        )


def check_lottery(recipe: Recipe, config: LotteryConfig, paths: LotteryPaths, results_root: str | Path) -> int:
    """Every check before anything is written; return round 0's number of optimizer steps.

    The lottery loads round 0's model and data as the runner will (`_prepare`) to know its length: the rewind
    step must not be past it."""
    from prune_trainer.recipes.runner import _prepare

    if recipe.task != "token-classification":  # the rounds are compared by entity F1
        raise ValueError(f"lottery: {recipe.source} has task {recipe.task!r}; the lottery runs token-classification "
                         "recipes only")
    if config.control != "none":
        _check_lottery_for_control(recipe, config, paths)
    round0 = round_recipe(recipe, paths.round_dir(0), _round0_options(config, paths))
    max_steps = _prepare(round0, results_root).max_steps
    if config.rewind_step > max_steps:
        raise ValueError(
            f"lottery: rewind step {config.rewind_step} is past the end of the first round ({max_steps} optimizer "
            f"steps); choose K <= {max_steps}"
        )
    return max_steps


def _round0_options(config: LotteryConfig, paths: LotteryPaths) -> dict[str, Any]:
    return {"save_weights_step": config.rewind_step, "save_weights_to": str(paths.rewind)}


def _run_round(recipe: Recipe, results_root: str | Path) -> dict[str, Any]:
    """A round's metrics: read when the round is complete, else run (or resume) it."""
    from prune_trainer.recipes.runner import run_recipe

    out_dir = Path(recipe.output_dir)
    if run_is_complete(out_dir):
        return json.loads((out_dir / METRICS_FILE).read_text())
    return run_recipe(recipe, results_root=results_root)


def _save_masks(masks: dict[str, torch.Tensor], path: Path) -> None:
    with atomic_file(path) as tmp:
        save_file({n: m.contiguous() for n, m in masks.items()}, str(tmp))


def _trained_weights(round_dir: Path, layers: list[str]) -> dict[str, torch.Tensor]:
    """The trained ``weight`` of each layer from a round's exported ``model/model.safetensors``."""
    path = round_dir / "model" / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the round did not export a single safetensors file")
    state = load_file(str(path))
    return {n: state[f"{n}.weight"] for n in layers}


def ensure_imp_masks(paths: LotteryPaths, r: int, config: LotteryConfig) -> Path:
    """Write ``masks/round_<r>.safetensors`` (once): `imp_masks` of round ``r−1``'s trained weights and masks."""
    path = paths.masks(r)
    if path.is_file():
        return path
    if r == 1:
        layers = list(json.loads((paths.round_dir(0) / METRICS_FILE).read_text())["sparsity_per_layer"])
        weights = _trained_weights(paths.round_dir(0), layers)
        previous = {n: torch.ones_like(w, dtype=torch.bool) for n, w in weights.items()}
    else:
        previous = {n: m.bool() for n, m in load_file(str(paths.masks(r - 1))).items()}
        weights = _trained_weights(paths.round_dir(r - 1), list(previous))
    _save_masks(imp_masks(weights, previous, compounded_sparsity(config.rate, r), config.scope), path)
    return path


def _row(r: int, config: LotteryConfig, metrics: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    row = {"round": r, "target_sparsity": compounded_sparsity(config.rate, r), "sparsity": metrics["sparsity"],
           "eval_f1": metrics["eval_f1"]}
    row.update({k: metrics[k] for k in ("test_f1", "train_steps", "wall_time_s", "git_commit") if k in metrics})
    row["dir"] = str(out_dir)
    return row


def _summary(recipe: Recipe, config: LotteryConfig, rows: list[dict[str, Any]], max_steps: int) -> dict[str, Any]:
    from prune_trainer.recipes.runner import _device_name, git_commit

    return {
        "name": recipe.name, "control": config.control, "rate": config.rate, "rewind": config.rewind,
        "scope": config.scope, "seed": config.seed if config.control != "none" else None,
        "budget": {"train_steps_per_round": max_steps, "max_train_samples": recipe.data.max_train_samples,
                   "training": recipe.resolved_training()},
        "rounds": rows, "git_commit": git_commit(), "device": _device_name(), "command": " ".join(sys.argv),
    }


def _imp_rounds(recipe: Recipe, config: LotteryConfig, paths: LotteryPaths, root: str | Path, steps: int) -> dict:
    """Round 0 (dense, saves the rewind point), then rounds 1..R from the rewind point with the IMP masks."""
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    for r in range(config.rounds + 1):
        if r == 0:
            options = _round0_options(config, paths)
        else:
            options = {"masks": str(ensure_imp_masks(paths, r, config)), "weights": str(paths.rewind)}
        metrics = _run_round(round_recipe(recipe, paths.round_dir(r), options), root)
        if r == 0 and not paths.rewind.is_file():
            raise FileNotFoundError(f"round 0 is complete but {paths.rewind} is missing: delete {paths.root} and rerun")
        rows.append(_row(r, config, metrics, paths.round_dir(r)))
        summary = _summary(recipe, config, rows, steps)
        atomic_write_json(paths.root / "summary.json", summary)
    return summary


def _control_weights(paths: LotteryPaths, config: LotteryConfig) -> Path:
    """The control's starting weights: the rewind point, or (random-reinit) it with the masked Linears redrawn."""
    if config.control != "random-reinit":
        return paths.rewind
    path = paths.out(config.control) / "weights.safetensors"
    if not path.is_file():
        layers = list(load_file(str(paths.masks(1))))
        model_config = json.loads((paths.round_dir(0) / "model" / "config.json").read_text())
        std = float(model_config.get("initializer_range", 0.02))
        state = reinit_linears(load_file(str(paths.rewind)), layers, std, config.seed)
        with atomic_file(path) as tmp:
            save_file(state, str(tmp))
    return path


def _control_masks(paths: LotteryPaths, r: int, config: LotteryConfig) -> Path:
    """Round ``r``'s masks of the control: the lottery's, or (random-mask) random ones with its per-layer counts."""
    if config.control != "random-mask":
        return paths.masks(r)
    path = paths.masks(r, config.control)
    if not path.is_file():
        _save_masks(random_masks_like(load_file(str(paths.masks(r))), config.seed * 1000 + r), path)
    return path


def _control_rounds(recipe: Recipe, config: LotteryConfig, paths: LotteryPaths, root: str | Path, steps: int) -> dict:
    rows: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    weights = _control_weights(paths, config)
    for r in range(1, config.rounds + 1):
        options = {"masks": str(_control_masks(paths, r, config)), "weights": str(weights)}
        out_dir = paths.round_dir(r, config.control)
        metrics = _run_round(round_recipe(recipe, out_dir, options), root)
        rows.append(_row(r, config, metrics, out_dir))
        summary = _summary(recipe, config, rows, steps)
        atomic_write_json(paths.out(config.control) / "summary.json", summary)
    return summary


def run_lottery(
    recipe: Recipe | dict[str, Any], config: LotteryConfig | None = None, results_root: str | Path = "results",
    **fields: Any,
) -> dict[str, Any]:
    """Run (or resume) a lottery ticket experiment, or one of its controls; return its summary.

    ``fields`` are `LotteryConfig` fields (``rounds=5, rate=0.2, rewind="step:50", control="random-mask"``).
    Bad values (a rate outside (0, 1), a rewind step past round 0's end, an unknown control) raise ValueError
    before anything is written."""
    config = (config or LotteryConfig()).replace(**fields)
    recipe = Recipe.from_dict(copy.deepcopy(recipe)) if isinstance(recipe, dict) else copy.deepcopy(recipe)
    paths = LotteryPaths(Path(recipe.output_dir or Path(results_root) / recipe.name))
    steps = check_lottery(recipe, config, paths, results_root)
    out = paths.out(config.control)
    with exclusive_lock(out / ".lock"):
        check_run_identity(out, _identity(recipe, config))
        rounds = _imp_rounds if config.control == "none" else _control_rounds
        return rounds(recipe, config, paths, results_root, steps)
