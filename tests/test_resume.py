"""Interrupted runs: complete checkpoints only, real ``kill -9`` during a checkpoint save and during the export,
run identity, the lock, whole-run totals after a resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from prune_trainer.cli import main
from prune_trainer.recipes.run_dir import last_checkpoint_step, run_is_complete

ROOT = Path(__file__).resolve().parents[1]

# Runs the CLI in a child process that stalls (so that the parent can kill it) at a chosen point: in a checkpoint
# save after the weights, before trainer_state.json ("checkpoint"), or in the final export after the model's
# weights, before the tokenizer and sparsity.json ("export"). It writes MARKER when it stalls.
CHILD = """
import sys, time
from pathlib import Path
import transformers
marker, where, step = sys.argv[1], sys.argv[2], int(sys.argv[3])
def stall():
    Path(marker).write_text("stalled")
    time.sleep(300)
if where == "checkpoint":
    save_rng = transformers.Trainer._save_rng_state
    def patched(self, output_dir):
        if self.state.global_step == step:
            stall()
        return save_rng(self, output_dir)
    transformers.Trainer._save_rng_state = patched
else:
    save_tok = transformers.PreTrainedTokenizerBase.save_pretrained
    def patched(self, save_directory, *args, **kwargs):
        if ".tmp-" in str(save_directory):
            stall()
        return save_tok(self, save_directory, *args, **kwargs)
    transformers.PreTrainedTokenizerBase.save_pretrained = patched
from prune_trainer.cli import main
sys.exit(main(sys.argv[4:]))
"""


def _recipe(tmp_path, max_steps=24):
    recipe = {
        "name": "tiny",
        "data": {"max_length": 32},
        "training": {"max_steps": max_steps, "per_device_train_batch_size": 8, "learning_rate": 5e-3,
                     "logging_steps": 2, "eval_strategy": "no", "save_steps": 6, "save_total_limit": None,
                     "use_cpu": True, "disable_tqdm": True},
        "pruning": {"method": "magnitude", "schedule": {"final_sparsity": 0.5, "end_step": 0.5, "frequency": 2}},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _argv(tmp_path, model_dir, data_dir):
    return ["run", str(_recipe(tmp_path)), "--model", str(model_dir), "--data-dir", str(data_dir),
            "--results-dir", str(tmp_path / "results")]


def _stalled_child(tmp_path, where, step, argv):
    """Start the CLI in a child that stalls at ``where``; return it once it has stalled."""
    marker = tmp_path / f"stalled-{where}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(marker), where, str(step), *argv], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 240
    while not marker.exists():
        if child.poll() is not None or time.monotonic() > deadline:
            child.kill()
            pytest.fail(f"child did not reach the {where} stall:\n{child.communicate()[0][-3000:]}")
        time.sleep(0.05)
    return child


def _kill9(child):
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    child.stdout.close()


def _write_ckpt(path, files):
    path.mkdir(parents=True)
    for name, text in files.items():
        (path / name).write_text(text)


def test_newest_complete_checkpoint_is_picked_and_incomplete_ones_are_named(tmp_path, capsys):
    full = {"trainer_state.json": "{}", "run_state.json": "{}", "model.safetensors": ""}
    _write_ckpt(tmp_path / "checkpoint-4", full)
    _write_ckpt(tmp_path / "checkpoint-8", {**full, "pruning_state.json": "{}"})
    _write_ckpt(tmp_path / "checkpoint-10", {k: v for k, v in full.items() if k != "model.safetensors"})
    _write_ckpt(tmp_path / "checkpoint-12", {**full, "trainer_state.json": '{"global_st'})  # cut mid-write
    assert last_checkpoint_step(tmp_path) == 8
    out = capsys.readouterr().out
    assert "checkpoint-12 (trainer_state.json missing or unreadable)" in out
    assert "checkpoint-10 (no model weights)" in out
    _write_ckpt(tmp_path / "checkpoint-9", full)
    assert last_checkpoint_step(tmp_path, pruned=True, log=None) == 8  # 9 lacks pruning_state.json
    assert last_checkpoint_step(tmp_path / "absent") is None
    _write_ckpt(tmp_path / "old" / "checkpoint-3", {"trainer_state.json": "{}", "model.safetensors": ""})
    assert last_checkpoint_step(tmp_path / "old") == 3  # an older version's checkpoint (no run_state.json)


def test_kill_during_checkpoint_save_then_rerun_finishes_with_whole_run_totals(
    tmp_path, tiny_model_dir, conll_dir, capsys
):
    argv = _argv(tmp_path, tiny_model_dir, conll_dir)
    out_dir = tmp_path / "results" / "tiny"
    child = _stalled_child(tmp_path, "checkpoint", 12, argv)
    try:
        # A second run on the same folder while the first is alive: a clear error, nothing touched.
        assert main(argv) == 2
        assert f"is in use by another run (pid {child.pid}" in capsys.readouterr().err
    finally:
        _kill9(child)
    assert not run_is_complete(out_dir) and not (out_dir / "model").exists()
    ckpts = out_dir / "checkpoints"
    assert (ckpts / "checkpoint-12").is_dir() and not (ckpts / "checkpoint-12" / "trainer_state.json").exists()
    carried = json.loads((ckpts / "checkpoint-6" / "run_state.json").read_text())

    t0 = time.time()
    assert main(argv) == 0
    elapsed = time.time() - t0
    printed = capsys.readouterr().out
    assert "taking over the stale lock" in printed
    assert "removing incomplete checkpoint" in printed and "checkpoint-12" in printed
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 6 and metrics["train_steps"] == 24
    logged = [row["loss"] for row in metrics["log_history"] if "loss" in row]
    assert len(logged) == 12  # every 2 steps over the whole run (the history is carried in the checkpoint)
    assert metrics["train_loss"] == pytest.approx(sum(logged) / len(logged), rel=1e-3)
    assert metrics["wall_time_s"] >= carried["wall_time_s"] + 0.8 * elapsed - 0.2
    assert not (out_dir / ".lock").exists()

    # Same folder, another recipe: refused, naming the changed key; --overwrite starts over.
    changed = argv + ["--set", "training.learning_rate=1e-3"]
    assert main(changed) == 2
    err = capsys.readouterr().err
    assert "changed: training.learning_rate" in err and "--overwrite" in err
    assert main(changed + ["--overwrite"]) == 0
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 0 and metrics["config"]["training"]["learning_rate"] == 1e-3


def test_kill_during_export_leaves_no_model_and_rerun_finishes(tmp_path, tiny_model_dir, conll_dir):
    from prune_trainer.export import is_complete_model_dir

    argv = _argv(tmp_path, tiny_model_dir, conll_dir) + ["--max-steps", "12"]
    out_dir = tmp_path / "results" / "tiny"
    _kill9(_stalled_child(tmp_path, "export", 0, argv))
    assert not (out_dir / "model").exists()  # the half-written export is a temporary sibling
    assert [p.name for p in out_dir.glob("model.tmp-*")]
    assert not (out_dir / "metrics.json").exists() and not run_is_complete(out_dir)

    assert main(argv) == 0
    assert run_is_complete(out_dir) and is_complete_model_dir(out_dir / "model")
    assert not list(out_dir.glob("model.*-*"))
    metrics = json.loads((out_dir / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 12 and metrics["train_steps"] == 12
    assert abs(metrics["sparsity"] - 0.5) < 1e-3
