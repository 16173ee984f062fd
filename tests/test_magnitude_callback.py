import time

import pytest
import torch
from helpers import make_trainer, tiny_bert
from transformers import TrainerCallback

from prune_trainer import MagnitudePruningCallback, PruningConfig, PruningSchedule, SparsityLoggingCallback
from prune_trainer.reporting import read_wandb_history


class ZeroChecker(TrainerCallback):
    """After every optimizer step: masked weights are exactly 0 and the pruned set only grows."""

    def __init__(self, pruner):
        self.pruner = pruner
        self.previous = None
        self.checked_steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        masks = {}
        for name, layer in self.pruner.layers.items():
            w = layer.weight.detach()
            assert bool((w[~layer.weight_mask] == 0).all()), f"revived weight in {name} at step {state.global_step}"
            masks[name] = layer.weight_mask.clone()
            if self.previous is not None:
                assert bool((masks[name] <= self.previous[name]).all()), "a pruned weight came back"
        self.previous = masks
        self.checked_steps += 1


def _pruner(model, scope="global", **overrides):
    schedule = dict(kind="cubic", final_sparsity=0.8, start_step=2, end_step=14, frequency=4)
    schedule.update(overrides)
    return MagnitudePruningCallback(model, PruningConfig(schedule=PruningSchedule(**schedule), scope=scope))


@pytest.mark.parametrize(
    "extra",
    [
        {},  # AdamW + weight decay
        {"gradient_accumulation_steps": 2},
        {"bf16": True},
        {"optim": "sgd", "learning_rate": 0.5},  # SGD (momentum via optim_args below)
    ],
    ids=["adamw", "grad_accum", "bf16_autocast", "sgd"],
)
def test_pruned_weights_stay_exactly_zero(tmp_path, extra):
    model = tiny_bert()
    pruner = _pruner(model)
    checker = ZeroChecker(pruner)
    if extra.get("optim") == "sgd":
        extra = {**extra, "optim_args": "momentum=0.9"}
    trainer = make_trainer(tmp_path, model, [pruner, checker], max_steps=20, **extra)
    trainer.train()
    assert checker.checked_steps == 20
    global_sparsity, _ = pruner.sparsity()
    assert global_sparsity == pytest.approx(0.8, abs=1e-3)
    # The weights themselves, not only the masks.
    zeros = sum(int((layer.weight == 0).sum()) for layer in pruner.layers.values())
    total = sum(layer.weight.numel() for layer in pruner.layers.values())
    assert zeros / total >= 0.8 - 1e-3


def test_schedule_targets_are_hit_at_each_pruning_step(tmp_path):
    model = tiny_bert()
    pruner = _pruner(model, scope="layer")
    seen = {}

    class Recorder(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen[state.global_step] = pruner.sparsity()

    make_trainer(tmp_path, model, [pruner, Recorder()], max_steps=16).train()
    schedule = pruner.schedule
    for step in (2, 6, 10, 14):
        # masks updated at the beginning of optimizer step `step` → visible at on_step_end of step+1
        global_s, per_layer = seen[step + 1]
        assert global_s == pytest.approx(schedule.target(step), abs=2e-3)
        assert all(abs(v - schedule.target(step)) < 5e-3 for v in per_layer.values())


def test_resume_reaches_the_same_masks_and_metrics(tmp_path):
    common = dict(max_steps=20, save_strategy="steps", save_steps=10, learning_rate=5e-3)

    full_model = tiny_bert(seed=3)
    full_pruner = _pruner(full_model)
    full = make_trainer(tmp_path / "full", full_model, [full_pruner], **common)
    full.train()
    full_metrics = full.evaluate()

    class StopAt10(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 10:
                control.should_training_stop = True

    part_model = tiny_bert(seed=3)
    make_trainer(tmp_path / "part", part_model, [_pruner(part_model), StopAt10()], **common).train()
    assert (tmp_path / "part" / "checkpoint-10" / "pruning_state.json").is_file()

    resumed_model = tiny_bert(seed=99)  # different init: everything must come from the checkpoint
    resumed_pruner = _pruner(resumed_model)
    resumed = make_trainer(tmp_path / "part", resumed_model, [resumed_pruner], **common)
    resumed.train(resume_from_checkpoint=True)
    assert resumed_pruner.last_pruned_step == full_pruner.last_pruned_step == 14
    for name, layer in full_pruner.layers.items():
        assert torch.equal(layer.weight_mask, resumed_pruner.layers[name].weight_mask), name
        torch.testing.assert_close(layer.weight, resumed_pruner.layers[name].weight, atol=1e-5, rtol=1e-4)
    assert resumed.evaluate()["eval_f1"] == pytest.approx(full_metrics["eval_f1"], abs=1e-6)


def test_sparsity_curves_reach_wandb_offline_history(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_PROJECT", "prune-trainer-test")
    model = tiny_bert()
    pruner = _pruner(model, end_step=10)
    trainer = make_trainer(tmp_path / "out", model, [pruner], max_steps=16,
                           logging_steps=4, report_to="wandb", run_name="test")
    SparsityLoggingCallback(pruner).install(trainer)
    assert type(trainer.callback_handler.callbacks[0]) is SparsityLoggingCallback
    trainer.train()
    import wandb

    wandb.finish()
    # wandb-core writes the run file asynchronously: wait (bounded) until the last logging step is in it.
    for _ in range(120):
        rows = read_wandb_history(tmp_path / "wandb")
        curves = [(r["train/global_step"], r["train/sparsity/global"], r["train/sparsity/target"])
                  for r in rows if "train/sparsity/global" in r]
        if curves and curves[-1][0] == 16:
            break
        time.sleep(0.5)
    assert len(curves) >= 3
    assert any(k.startswith("train/sparsity/bert.encoder.layer.0.") for r in rows for k in r)
    # The logged global sparsity follows the schedule and ends at the target.
    assert curves[-1][1] == pytest.approx(0.8, abs=1e-3)
    assert [c[1] for c in curves] == sorted(c[1] for c in curves)
    # Same values in the Trainer's own log history.
    logged = [h["sparsity/global"] for h in trainer.state.log_history if "sparsity/global" in h]
    assert logged == pytest.approx([c[1] for c in curves])


def test_nm_pattern_that_does_not_fit_fails_before_touching_the_model():
    from prune_trainer.masking import masked_layers

    model = tiny_bert()  # in_features 32 and 64: 3:5 fits neither
    with pytest.raises(ValueError, match="does not divide in_features=32 of layer bert.encoder.layer.0"):
        MagnitudePruningCallback(model, pattern="3:5")
    assert masked_layers(model) == {}


def test_pruning_time_is_timed_once_per_step_and_kept_in_the_state():
    class Slow(MagnitudePruningCallback):
        def compute_masks(self, step, target, context):  # the base class times the whole pruning step
            time.sleep(0.02)
            return super().compute_masks(step, target, context)

    pruner = Slow(tiny_bert(), final_sparsity=0.5, start_step=0, end_step=2, frequency=1)
    pruner.schedule = pruner.config.schedule.resolve(4)
    pruner.prune(1)
    pruner.prune(2)
    assert pruner.last_pruned_step == 2 and pruner.current_target == 0.5
    assert pruner.pruning_steps == 2 and pruner.pruning_time_s >= 0.04
    state = pruner.state_dict()
    assert state["pruning_steps"] == 2 and state["pruning_time_s"] == pruner.pruning_time_s
    fresh = MagnitudePruningCallback(tiny_bert(), final_sparsity=0.5, start_step=0, end_step=2, frequency=1)
    fresh.load_state_dict(state)
    assert fresh.pruning_steps == 2 and fresh.pruning_time_s == state["pruning_time_s"]
    del state["pruning_time_s"], state["pruning_steps"]  # a checkpoint written before these keys existed
    fresh.load_state_dict(state)
    assert fresh.pruning_steps == 0 and fresh.pruning_time_s == 0.0


def test_resume_from_a_checkpoint_without_pruning_state_is_an_error(tmp_path):
    model = tiny_bert()
    make_trainer(tmp_path, model, [_pruner(model)], max_steps=6, save_strategy="steps", save_steps=3).train()
    (tmp_path / "checkpoint-6" / "pruning_state.json").unlink()
    resumed_model = tiny_bert()
    trainer = make_trainer(tmp_path, resumed_model, [_pruner(resumed_model)], max_steps=8)
    with pytest.raises(FileNotFoundError, match="checkpoint-6, which holds no pruning_state.json"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-6"))


def test_load_best_model_at_end_is_refused_with_pruning(tmp_path):
    model = tiny_bert()
    trainer = make_trainer(tmp_path, model, [_pruner(model)], max_steps=4, load_best_model_at_end=True,
                           eval_strategy="steps", save_strategy="steps", eval_steps=2, save_steps=2)
    with pytest.raises(ValueError, match="load_best_model_at_end=True cannot be combined with pruning"):
        trainer.train()


def test_wandb_run_file_reader_stops_at_a_record_still_being_written(tmp_path):
    import struct

    from prune_trainer.reporting.wandb_offline import _records

    full = struct.pack("<IHB", 0, 3, 1) + b"abc"
    cut = struct.pack("<IHB", 0, 10, 1) + b"defg"  # header says 10 bytes, 4 written so far
    path = tmp_path / "run-x.wandb"
    path.write_bytes(b":W&B\x00\x00\x01" + full + cut)
    assert _records(path) == [b"abc"]
