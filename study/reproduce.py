"""``python -m study reproduce``: the whole study as one resumable command, planned in ``study/plan.yaml``.

The plan is an ordered list of steps (see the comments at the top of ``study/plan.yaml``): recipe runs
(``prune-trainer run``), one-shot grids and their pages (``python -m study oneshot-grid`` / ``oneshot-table`` /
``oneshot-samples``) and the report (``python -m study report``). For each step the driver works out

- its **status**: ``done`` (its ``metrics.json`` exists: ``<results>/runs/<name>/`` for a recipe trained as
  shipped, ``<results>/ablations/<name>/`` for a variant; one-shot: every setting of the step is in a JSON of
  the folder its ``out`` JSON is in, ``<results>/oneshot/<model>/``, since a setting key does not name the
  model), ``resumable`` (a Trainer checkpoint in the run's ``checkpoints/``, or part of a one-shot grid),
  ``to run``, ``re-run`` (dense weights missing, see below) or ``up to date`` (one-shot table / sample-size
  figure / report newer than their inputs);
- its **exact command**, which is what runs: each step is its own process (``sys.executable -m ...``), so memory
  is returned between steps and the ``peak_rss_mib`` a run records is its own;
- an **estimated time** on the 2-core CPU machine from the recipe's epochs and the plan's ``estimates`` (an
  estimate, not a measurement).

Dependencies: a step whose ``init_from`` (or distillation teacher, or one-shot ``model_from``) is the exported
model of an earlier step runs after it. When that step is done but its model folder is missing (exported
weights are gitignored: a fresh clone), the driver runs that step again to rebuild the weights (overwriting its
``metrics.json``); with ``--only``, steps needed by the selected ones are added. A failed step stops the driver;
running it again skips what finished and resumes the interrupted run from its last checkpoint.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prune_trainer.export.export import is_complete_model_dir
from prune_trainer.recipes.runner import last_checkpoint_step, load_recipe, run_is_complete
from prune_trainer.yaml_io import load_yaml

DEFAULT_PLAN = str(Path(__file__).with_name("plan.yaml"))
STUDY_ROOT = Path(__file__).resolve().parent.parent
"""The folder that holds the ``study`` package (put on ``PYTHONPATH`` of every step's process)."""
STEP_KINDS = ("recipe", "oneshot", "oneshot_table", "oneshot_samples", "report")
ONESHOT_PAGE_KINDS = ("oneshot_table", "oneshot_samples")
"""Steps that write a markdown page (table / sample-size figure) from the grid JSONs of one folder."""
STEP_KEYS = {"name", "set", "est_min_per_epoch", "est_min_per_setting", *STEP_KINDS}
PLAN_KEYS = {"estimates", "recipe_dir", "steps"}
DEFAULT_ESTIMATES: dict[str, float] = {
    "min_per_epoch": 8.0,  # embedded model, full CoNLL-2003, 2 CPU cores
    "min_per_epoch_distillation": 10.0,
    "min_per_oneshot_setting": 2.0,
    "train_sentences": 14041,
}
ONESHOT_GLOB = "*.json"
"""Grid JSONs of one dense model: ``<results>/oneshot/<model>/<method>.json``."""
ONESHOT_DIR = "oneshot"
RUNS_DIR = "runs"
"""``<results>/runs/<name>``: a shipped recipe trained as committed."""
ABLATIONS_DIR = "ablations"
"""``<results>/ablations/<name>``: a variant (overrides or another name) of a recipe."""
CLI_MODULE = "prune_trainer"
STUDY_MODULE = "study"

Executor = Callable[["Step"], int]


@dataclass
class Step:
    """One planned step: what it runs, whether it runs now, and why."""

    name: str
    kind: str
    module: str
    argv: list[str]
    status: str = "to run"
    detail: str = ""
    selected: bool = True
    run: bool = False
    estimate_min: float = 0.0
    needs: list[str] = field(default_factory=list)
    """Names of the earlier steps whose exported model this step starts from."""
    model_dir: Path | None = None
    """The exported model a recipe step writes."""
    output: Path | None = None
    """The file a one-shot grid / table / report step writes."""
    inputs: list[Path] = field(default_factory=list)
    """One-shot table: the grid JSONs it may read."""
    resume_step: int | None = None
    """Recipe step: the global step of its newest Trainer checkpoint (the run resumes there)."""
    missing_inputs: list[str] = field(default_factory=list)

    def command(self, python: str | None = None) -> list[str]:
        """The full command line (``python -m <module> <argv>``)."""
        return [python or sys.executable, "-m", self.module, *self.argv]

    def display_command(self) -> str:
        """The command as printed: the interpreter relative to the working directory when it is inside it."""
        python = sys.executable
        try:
            rel = os.path.relpath(python)
            python = rel if not rel.startswith("..") else python
        except ValueError:  # another drive (Windows)
            pass
        return shlex.join(self.command(python))


# ---- plan ---------------------------------------------------------------------------------------------------
def load_plan(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a plan YAML: ``estimates`` and ``recipe_dir`` (where ``recipe:`` files are, relative to
    the plan; default its own folder), both optional, and ``steps`` (a list of step mappings)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"plan {str(path)!r} does not exist")
    plan = load_yaml(path.read_text()) or {}
    if not isinstance(plan, dict) or not isinstance(plan.get("steps"), list) or not plan["steps"]:
        raise ValueError(f"plan {path} must be a mapping with a non-empty list 'steps'")
    if set(plan) - PLAN_KEYS:
        raise ValueError(f"plan {path}: unknown top-level key(s) {sorted(set(plan) - PLAN_KEYS)}")
    for i, spec in enumerate(plan["steps"], 1):
        if not isinstance(spec, dict):
            raise ValueError(f"plan {path}: step {i} must be a mapping, got {spec!r}")
        kinds = [k for k in STEP_KINDS if k in spec]
        if len(kinds) != 1:
            raise ValueError(f"plan {path}: step {i} needs exactly one of {list(STEP_KINDS)}, got {sorted(spec)}")
        unknown = set(spec) - STEP_KEYS
        if unknown:
            raise ValueError(f"plan {path}: step {i} has unknown key(s) {sorted(unknown)}")
    return plan


def _display_path(path: Path) -> str:
    """``path`` relative to the working directory when it is below it, else as given."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _model_present(model_dir: Path | None) -> bool:
    """A complete exported model folder (`is_complete_model_dir`: config, weights, tokenizer, sparsity.json)."""
    return model_dir is not None and is_complete_model_dir(model_dir)


def _producer(value: Any, recipe_steps: dict[str, int]) -> str | None:
    """Name of the recipe step whose exported model ``value`` (a path ``.../<name>/model``) is."""
    if not isinstance(value, str):
        return None
    parts = Path(value).parts
    if len(parts) >= 2 and parts[-1] == "model" and parts[-2] in recipe_steps:
        return parts[-2]
    return None


def _oneshot_keys(spec: dict[str, Any]) -> list[str]:
    """The grid setting keys (``method|level|owl|n<calib>|s<seed>``) a one-shot step produces."""
    from study.oneshot_grid import setting_key

    owl_modes = {"no": [False], "yes": [True], "both": [False, True]}[spec.get("owl", "no")]
    keys = []
    for level in _levels(spec):
        for owl in owl_modes:
            if owl and ":" in level:
                continue
            for calib in _calibs(spec):
                keys.append(setting_key(spec["method"], level, owl, calib, int(spec.get("seed", 0))))
    return keys


def _calibs(spec: dict[str, Any]) -> list[int]:
    """``calib``: one number of calibration sentences or a list of them (a sample-size grid)."""
    value = spec.get("calib", 1024)
    values = value if isinstance(value, list) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in values):
        raise ValueError(f"one-shot calib must be a positive integer or a list of them, got {value!r}")
    return values


def _levels(spec: dict[str, Any]) -> list[str]:
    levels = []
    for level in spec.get("levels", []):
        if isinstance(level, int) and not isinstance(level, bool) and level > 1:
            raise ValueError(f"one-shot level {level!r} looks like an unquoted N:M pattern; write it as '2:4'")
        levels.append(str(level))
    return levels


def _existing_oneshot(results_dir: Path) -> tuple[list[Path], set[str]]:
    """The grid JSON files under ``results_dir`` and the union of their setting keys."""
    files = sorted(results_dir.glob(ONESHOT_GLOB))
    keys: set[str] = set()
    for path in files:
        try:
            keys.update(k for k in json.loads(path.read_text()) if k != "dense")
        except (OSError, json.JSONDecodeError):
            continue
    return files, keys


def _newest_mtime(paths: Iterable[Path]) -> float:
    return max((p.stat().st_mtime for p in paths if p.is_file()), default=0.0)


def _epochs_of(training: dict[str, Any]) -> str:
    """A run's budget as text: ``3 epochs``, ``1 epoch`` or ``400 steps``."""
    if training.get("max_steps", -1) not in (-1, None):
        return f"{training['max_steps']} steps"
    epochs = float(training.get("num_train_epochs", 3))
    return f"{epochs:g} epoch{'' if epochs == 1 else 's'}"


@dataclass
class _Plan:
    """A plan read once: its recipe steps resolved, step names, where each run's results go, who needs whom."""

    path: Path
    spec: dict[str, Any]
    results: Path
    est: dict[str, float]
    common_data: list[str]
    epochs: float | None
    recipes: dict[int, tuple[dict[str, Any], list[str], Path]]
    names: list[str]
    recipe_index: dict[str, int]
    producers: set[str]
    grid_state: dict[Path, tuple[list[Path], set[str]]] = field(default_factory=dict)

    def grid_folder(self, folder: Path) -> tuple[list[Path], set[str]]:
        """The grid JSONs of ``folder`` and their finished setting keys (read once per folder)."""
        if folder not in self.grid_state:
            self.grid_state[folder] = _existing_oneshot(folder)
        return self.grid_state[folder]

    def run_dir(self, name: str) -> Path:
        """``<results>/runs/<name>`` for a recipe as shipped, ``<results>/ablations/<name>`` for a variant."""
        recipe, _, path = self.recipes[self.recipe_index[name]]
        return Path(recipe.get("output_dir") or self.results / _group(recipe, path) / name)

    def earlier(self, dep: str, what: str, i: int) -> None:
        """A step may only use the model of an earlier step."""
        if self.recipe_index[dep] > i:
            raise ValueError(f"plan {self.path}: step {self.names[i]!r} uses the {what} of step {dep!r}, "
                             "which comes later")


def _group(recipe: dict[str, Any], path: Path) -> str:
    """``runs`` when the step trains its recipe file under that recipe's own name, else ``ablations``."""
    return RUNS_DIR if recipe["name"] == load_recipe(path)["name"] else ABLATIONS_DIR


def _read_plan(plan_path: Path, results_dir: str | os.PathLike, data_dir: str | None,
               epochs: float | None) -> _Plan:
    """Pass 1 over the plan: load every recipe step (with its overrides), name every step, find producers."""
    spec = load_plan(plan_path)
    recipe_dir = plan_path.parent / str(spec.get("recipe_dir", "."))  # an absolute path stays as it is
    recipes: dict[int, tuple[dict[str, Any], list[str], Path]] = {}
    names: list[str] = []
    for i, step in enumerate(spec["steps"]):
        if "recipe" in step:
            path = recipe_dir / step["recipe"]
            overrides = [str(o) for o in step.get("set") or []]
            recipe = load_recipe(path, overrides + ([f"name={step['name']}"] if step.get("name") else []))
            recipes[i] = (recipe, overrides, path)
            names.append(recipe["name"])
        else:
            names.append(str(step["name"]) if "name" in step else next(k for k in STEP_KINDS if k in step))
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ValueError(f"plan {plan_path}: step names must be unique, repeated: {sorted(dupes)}")
    recipe_index = {recipes[i][0]["name"]: i for i in recipes}
    producers = {str((step.get("oneshot") or {}).get("model_from")) for step in spec["steps"]}
    for recipe, _, _ in recipes.values():
        teacher = (recipe.get("distillation") or {}).get("teacher")
        producers.update(filter(None, (_producer(recipe.get("init_from"), recipe_index),
                                       _producer(teacher, recipe_index))))
    return _Plan(plan_path, spec, Path(results_dir), {**DEFAULT_ESTIMATES, **(spec.get("estimates") or {})},
                 ["--data-dir", str(data_dir)] if data_dir else [], epochs, recipes, names, recipe_index, producers)


def build_steps(
    plan_path: str | os.PathLike = DEFAULT_PLAN,
    results_dir: str | os.PathLike = "results",
    data_dir: str | None = None,
    epochs: float | None = None,
    only: list[str] | None = None,
) -> list[Step]:
    """The plan's steps with their commands, statuses, estimates and whether each runs in this invocation."""
    plan = _read_plan(Path(plan_path), results_dir, data_dir, epochs)
    steps: list[Step] = []
    for i, spec in enumerate(plan.spec["steps"]):
        if i in plan.recipes:
            steps.append(_recipe_step(plan, i))
        elif "oneshot" in spec:
            steps.append(_oneshot_step(plan, i, dict(spec["oneshot"]), spec))
        elif any(k in spec for k in ONESHOT_PAGE_KINDS):
            steps.append(_page_step(plan, i, spec, steps))
        else:
            steps.append(_report_step(plan, i))
    _select(steps, only)
    _finish_tables(steps)
    return steps


def _recipe_argv(plan: _Plan, i: int) -> tuple[list[str], list[str], list[str]]:
    """``run <recipe> [--set ...] [--name ...]`` with the models of earlier steps rewritten to where they are;
    also the names of those steps and the ``init_from`` paths that do not exist."""
    recipe, overrides, path = plan.recipes[i]
    name = plan.names[i]
    argv = ["run", _display_path(path)]
    for item in overrides:
        argv += ["--set", item]
    if name != load_recipe(path)["name"]:
        argv += ["--name", name]
    needs: list[str] = []
    missing: list[str] = []
    dist = recipe.get("distillation") or {}
    for key, value in (("init_from", recipe.get("init_from")), ("distillation.teacher", dist.get("teacher"))):
        dep = _producer(value, plan.recipe_index)
        if dep is not None:
            plan.earlier(dep, f"model ({key})", i)
            needs.append(dep)
            wanted = str(plan.run_dir(dep) / "model")
            if os.path.normpath(str(value)) != os.path.normpath(wanted):
                argv += ["--set", f"{key}={wanted}"]
        elif isinstance(value, str) and key == "init_from" and not Path(value).exists():
            missing.append(value)
    if plan.epochs is not None:
        argv += ["--set", f"training.num_train_epochs={plan.epochs:g}"]
    argv += [*plan.common_data, "--results-dir", str(plan.run_dir(name).parent)]
    return argv, sorted(set(needs)), missing


def _recipe_step(plan: _Plan, i: int) -> Step:
    """A training run: its command, status (done / resumable / to run) and estimated minutes."""
    from prune_trainer.recipes.runner import DEFAULT_TRAINING

    recipe = plan.recipes[i][0]
    name, spec = plan.names[i], plan.spec["steps"][i]
    argv, needs, missing = _recipe_argv(plan, i)
    out = plan.run_dir(name)
    training = {**DEFAULT_TRAINING, **(recipe.get("training") or {})}
    if plan.epochs is not None:
        training["num_train_epochs"] = plan.epochs
    steps_per_epoch = math.ceil(plan.est["train_sentences"] / int(training["per_device_train_batch_size"]))
    if training.get("max_steps", -1) not in (-1, None):
        total_steps = int(training["max_steps"])
    else:
        total_steps = math.ceil(float(training["num_train_epochs"]) * steps_per_epoch)
    per_epoch = spec.get("est_min_per_epoch") or (
        plan.est["min_per_epoch_distillation"] if recipe.get("distillation") else plan.est["min_per_epoch"])
    step = Step(name, "recipe", CLI_MODULE, argv, needs=needs, model_dir=out / "model", missing_inputs=missing)
    ckpt = last_checkpoint_step(out / "checkpoints", pruned=bool(recipe.get("pruning")), log=None)
    step.resume_step = ckpt
    step.estimate_min = total_steps / steps_per_epoch * float(per_epoch)
    if ckpt is not None:
        step.estimate_min *= max(0.0, 1.0 - ckpt / max(total_steps, 1))
    if run_is_complete(out):
        step.status = "done"
        step.detail = _done_detail(out / "metrics.json", training)
        if name in plan.producers and not _model_present(step.model_dir):
            step.detail = "; ".join(filter(None, [step.detail, f"weights {step.model_dir} absent (gitignored): "
                                                  "trained again only if a step that needs them runs"]))
    elif ckpt is not None:
        step.status = "resumable"
        step.detail = f"resumes from checkpoint-{ckpt} of {total_steps} steps"
    return step


def _oneshot_model(plan: _Plan, i: int, os_spec: dict[str, Any]) -> tuple[str, list[str]]:
    """The model a one-shot grid prunes (``model_from`` a recipe step, or a ``model`` path) and its producer."""
    name = plan.names[i]
    if "method" not in os_spec or not os_spec.get("levels"):
        raise ValueError(f"plan {plan.path}: one-shot step {name!r} needs 'method' and 'levels'")
    if os_spec.get("model_from"):
        dep = str(os_spec["model_from"])
        if dep not in plan.recipe_index:
            raise ValueError(f"plan {plan.path}: step {name!r}: model_from {dep!r} is not a recipe step")
        plan.earlier(dep, "model (model_from)", i)
        return str(plan.run_dir(dep) / "model"), [dep]
    if os_spec.get("model"):
        return str(os_spec["model"]), []
    raise ValueError(f"plan {plan.path}: one-shot step {name!r} needs 'model_from' or 'model'")


def _oneshot_step(plan: _Plan, i: int, os_spec: dict[str, Any], spec: dict[str, Any]) -> Step:
    """A one-shot grid of one method: done when every setting is in a grid JSON of its output folder."""
    name = plan.names[i]
    model, needs = _oneshot_model(plan, i, os_spec)
    default_out = f"{ONESHOT_DIR}/{os_spec.get('model_from') or 'model'}/{os_spec['method']}.json"
    out_json = plan.results / str(os_spec.get("out", default_out))
    if not fnmatch.fnmatchcase(out_json.name, ONESHOT_GLOB):
        raise ValueError(f"plan {plan.path}: step {name!r}: out {out_json.name!r} must match {ONESHOT_GLOB}")
    keys = _oneshot_keys(os_spec)
    oneshot_files, oneshot_done = plan.grid_folder(out_json.parent)
    others = [str(p) for p in oneshot_files if p != out_json]
    argv = ["oneshot-grid", "--model", model, "--out", str(out_json), "--methods", str(os_spec["method"]),
            "--sparsities", ",".join(_levels(os_spec)), "--owl", str(os_spec.get("owl", "no")),
            "--calib", ",".join(map(str, _calibs(os_spec))), *plan.common_data]
    if others:
        argv += ["--done", *others]
    n_done = sum(k in oneshot_done for k in keys)
    step = Step(name, "oneshot", STUDY_MODULE, argv, needs=needs, output=out_json)
    step.status = "done" if n_done == len(keys) else ("resumable" if n_done else "to run")
    step.detail = f"{n_done}/{len(keys)} settings in {out_json.parent / ONESHOT_GLOB}"
    step.estimate_min = (len(keys) - n_done) * float(spec.get("est_min_per_setting")
                                                     or plan.est["min_per_oneshot_setting"])
    return step


def _page_step(plan: _Plan, i: int, spec: dict[str, Any], steps: list[Step]) -> Step:
    """A one-shot table or sample-size page from the grid JSONs of one folder; up to date when newer than them."""
    kind = next(k for k in ONESHOT_PAGE_KINDS if k in spec)
    t_spec = dict(spec[kind] or {})
    if "dir" not in t_spec:
        raise ValueError(f"plan {plan.path}: {kind} step {plan.names[i]!r} needs 'dir' (e.g. oneshot/dense)")
    folder = plan.results / str(t_spec["dir"])  # the grid JSONs of one dense model
    outs = {s.output for s in steps if s.kind == "oneshot" and s.output and s.output.parent == folder}
    inputs = sorted({*plan.grid_folder(folder)[0], *outs})
    if kind == "oneshot_table":
        md = plan.results / str(t_spec.get("md", f"{folder.relative_to(plan.results)}/README.md"))
        argv = ["oneshot-table", "--md", str(md), "--calib", str(int(t_spec.get("calib", 1024)))]  # --json: later
        if t_spec.get("reference"):
            argv.append("--reference")
        outputs = [md]
    else:
        md = plan.results / str(t_spec.get("md", f"{folder.relative_to(plan.results)}/samples.md"))
        png = plan.results / str(t_spec.get("png", md.with_suffix(".png").relative_to(plan.results)))
        argv = ["oneshot-samples", "--md", str(md), "--png", str(png)]  # --json: _finish_tables
        outputs = [md, png]
    step = Step(plan.names[i], kind, STUDY_MODULE, argv, output=md, inputs=inputs)
    if all(o.is_file() for o in outputs) and min(o.stat().st_mtime for o in outputs) >= _newest_mtime(inputs):
        step.status, step.detail = "up to date", f"{md} is newer than its inputs"
    step.estimate_min = 0.1
    return step


def _report_step(plan: _Plan, i: int) -> Step:
    """``python -m study report``: up to date when its README is newer than every run's metrics and page."""
    results = plan.results
    readme = results / "README.md"
    step = Step(plan.names[i], "report", STUDY_MODULE, ["report", str(results)], output=readme)
    inputs = [*(p for group in (RUNS_DIR, ABLATIONS_DIR) for p in (results / group).glob("*/metrics.json")),
              *results.glob(f"{ONESHOT_DIR}/*/*.json")]
    if readme.is_file() and readme.stat().st_mtime >= _newest_mtime(inputs):
        step.status, step.detail = "up to date", f"{readme} is newer than every metrics.json"
    step.estimate_min = 0.2
    return step


def _finish_tables(steps: list[Step]) -> None:
    """One-shot table steps read the grid JSONs that exist or that a running grid step writes."""
    written = {s.output for s in steps if s.kind == "oneshot" and s.run}
    for step in steps:
        if step.kind not in ONESHOT_PAGE_KINDS:
            continue
        inputs = [p for p in step.inputs if p.is_file() or p in written]
        if not inputs:
            step.status, step.detail, step.run = "nothing to do", "no one-shot results", False
        step.argv[1:1] = ["--json", *map(str, inputs)]


def _done_detail(metrics_path: Path, planned: dict[str, Any]) -> str:
    """``ran 1 epochs (plan: 2 epochs)`` when the recorded run's budget differs from the planned one."""
    try:
        ran = (json.loads(metrics_path.read_text()).get("config") or {}).get("training") or {}
    except (OSError, json.JSONDecodeError):
        return ""
    before, now = _epochs_of(ran), _epochs_of(planned)
    return f"ran {before} (plan: {now}); delete the folder to redo it" if before != now else ""


def _select(steps: list[Step], only: list[str] | None) -> None:
    """Set ``selected`` / ``run``: ``--only`` patterns, skipping finished steps, pulling in needed ones."""
    patterns = [p.strip() for item in only or [] for p in item.split(",") if p.strip()]
    by_name = {s.name: s for s in steps}
    for step in steps:
        step.selected = not patterns or any(fnmatch.fnmatchcase(step.name, p) for p in patterns)
        step.run = step.selected and step.status in ("to run", "resumable")
    if patterns and not any(s.selected for s in steps):
        raise ValueError(f"--only {','.join(patterns)} matches no step; steps: {', '.join(by_name)}")
    needed_by: dict[str, list[str]] = {}
    for step in reversed(steps):  # dependencies come earlier: visiting backwards reaches their own needs later
        if not step.run:
            continue
        for dep_name in step.needs:
            dep = by_name[dep_name]
            needed_by.setdefault(dep_name, []).insert(0, step.name)
            if dep.run or (dep.status == "done" and _model_present(dep.model_dir)):
                continue
            dep.run = True
            if dep.status == "done":
                dep.status = "re-run"
    for dep_name, users in needed_by.items():
        dep = by_name[dep_name]
        who = ", ".join(users[:3]) + (f" and {len(users) - 3} more" if len(users) > 3 else "")
        if dep.status == "re-run":
            how = (f"resumes from its checkpoint-{dep.resume_step} (evaluates and exports again)"
                   if dep.resume_step is not None else f"trains {dep.name} again")
            dep.detail = (f"its metrics exist but the weights {dep.model_dir} are missing (gitignored, e.g. a fresh "
                          f"clone) and {who} need them: {how}; this overwrites {dep.name}/metrics.json")
        elif dep.run and not dep.selected:
            dep.detail = f"{dep.detail + '; ' if dep.detail else ''}not selected, but {who} need it"
    ran_before = False
    oneshot_ran = False
    for step in steps:  # tables and report follow anything that runs before them
        if step.kind in ONESHOT_PAGE_KINDS and step.selected and oneshot_ran and not step.run:
            step.run, step.status, step.detail = True, "to run", "after the one-shot grids above"
        if step.kind == "report" and step.selected and ran_before and not step.run:
            step.run, step.status, step.detail = True, "to run", "after the steps above"
        if step.run:
            ran_before = True
            oneshot_ran = oneshot_ran or step.kind == "oneshot"


def _fmt_min(minutes: float) -> str:
    if minutes < 1:
        return "< 1 min"
    if minutes < 90:
        return f"{minutes:.0f} min"
    return f"{minutes / 60:.1f} h"


def data_summary(data_dir: str | None) -> str:
    """Where the data comes from and which splits get evaluated (validation, and test when the data has it)."""
    from prune_trainer.data.conll import DATA_DIR_ENV, HUB_DATASET, SPLIT_FILES, resolve_data_dir

    try:
        path = resolve_data_dir(data_dir)
    except FileNotFoundError as err:
        return f"data: ERROR {err}"
    if path is None:
        return f"data: hub dataset {HUB_DATASET} (train, validation, test: F1 on validation and test)"
    source = "--data-dir" if data_dir else f"${DATA_DIR_ENV}"
    has_test = (path / SPLIT_FILES["test"]).is_file()
    splits = "F1 on validation and test" if has_test else "no test.txt: F1 on validation only"
    return f"data: {path} ({source}; {splits})"


def format_plan(steps: list[Step], plan_path: str | os.PathLike, results_dir: str | os.PathLike,
                data_dir: str | None = None) -> str:
    """The dry-run text: every step in order with its status, estimate and exact command."""
    lines = [
        f"plan {plan_path}: {len(steps)} steps, results in {results_dir}/",
        data_summary(data_dir),
        "times: ESTIMATES for the embedded model on full CoNLL-2003 on the 2-core CPU machine (from each recipe's "
        "epochs: ~8 min/epoch, ~10 with distillation; see the plan), not measurements",
        "",
    ]
    width = max(len(s.name) for s in steps)
    for i, step in enumerate(steps, 1):
        if step.run:
            status = step.status
        elif not step.selected:
            status = f"{step.status}, not selected (--only)"
        else:
            status = step.status
        est = f"est. {_fmt_min(step.estimate_min)}" if step.run else ""
        lines.append(f"{i:>2}. {step.name:<{width}}  {'RUN ' if step.run else 'skip'}  [{status}]  {est}".rstrip())
        if step.detail:
            lines.append(f"      {step.detail}")
        if step.missing_inputs:
            lines.append(f"      MISSING input: {', '.join(step.missing_inputs)}")
        lines.append(f"      $ {step.display_command()}")
    todo = [s for s in steps if s.run]
    lines += ["", f"to run: {len(todo)} of {len(steps)} steps, estimated {_fmt_min(sum(s.estimate_min for s in todo))}"
              f" on the 2-core CPU machine (estimate); {sum(s.status in ('done', 'up to date') for s in steps)} done"]
    return "\n".join(lines)


# ---- execution ----------------------------------------------------------------------------------------------
def subprocess_executor(step: Step) -> int:
    """Run the step's command in a child process (the default): its own memory peak, memory freed after."""
    path = os.pathsep.join(filter(None, [str(STUDY_ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run(step.command(), check=False, env={**os.environ, "PYTHONPATH": path}).returncode


def in_process_executor(step: Step) -> int:
    """Run the step's command in this process (tests, debugging): same arguments, no new interpreter."""
    if step.module == CLI_MODULE:
        from prune_trainer.cli import main
    else:
        from study.cli import main
    return int(main(list(step.argv)) or 0)


def run_steps(steps: list[Step], executor: Executor = subprocess_executor, log: Callable[[str], None] = print) -> int:
    """Run the steps marked ``run`` in order; stop at the first failure (exit code returned, 0 if all ran)."""
    blocked = [f"{s.name}: {', '.join(s.missing_inputs)}" for s in steps if s.run and s.missing_inputs]
    if blocked:
        raise FileNotFoundError("missing inputs, nothing was run: " + "; ".join(blocked))
    todo = [s for s in steps if s.run]
    for n, step in enumerate(todo, 1):
        log(f"==> [{n}/{len(todo)}] {step.name} ({step.status}; est. {_fmt_min(step.estimate_min)}): "
            f"{step.display_command()}")
        start = time.time()
        rc = executor(step)
        minutes = (time.time() - start) / 60
        if rc != 0:
            log(f"==> {step.name} FAILED (exit code {rc}) after {minutes:.1f} min. Run the same reproduce command "
                "again: finished steps are skipped and this one resumes from its last checkpoint.")
            return rc
        log(f"==> {step.name} finished in {minutes:.1f} min")
    if not todo:
        log("nothing to run: every step is done")
    return 0


def reproduce(
    plan_path: str | os.PathLike = DEFAULT_PLAN,
    results_dir: str | os.PathLike = "results",
    data_dir: str | None = None,
    dry_run: bool = False,
    only: list[str] | None = None,
    epochs: float | None = None,
    executor: Executor = subprocess_executor,
    log: Callable[[str], None] = print,
) -> int:
    """Plan, print the plan, and (unless ``dry_run``) run what is not done yet; returns an exit code."""
    steps = build_steps(plan_path, results_dir, data_dir, epochs, only)
    log(format_plan(steps, plan_path, results_dir, data_dir))
    if dry_run:
        return 0
    from prune_trainer.data.conll import resolve_data_dir

    if any(s.run and s.kind in ("recipe", "oneshot") for s in steps):
        resolve_data_dir(data_dir)  # a bad data directory fails before anything runs
    log("")
    return run_steps(steps, executor, log)
