"""`FiniteCheckCallback`: a NaN/inf gradient or loss stops the run (nothing exported) or skips the step."""

import json

import pytest
import torch
import transformers
import yaml
from helpers import make_trainer, tiny_bert

from prune_trainer.callbacks.finite import FiniteCheckCallback
from prune_trainer.cli import main


def _inject_nan_grad(monkeypatch, at_step):
    """After the backward of optimizer step ``at_step`` (1-based), one gradient entry becomes NaN."""
    original = transformers.Trainer.training_step

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = original(self, model, inputs, num_items_in_batch)
        if self.state.global_step + 1 == at_step:
            next(p for p in model.parameters() if p.grad is not None).grad.view(-1)[0] = float("nan")
        return loss

    monkeypatch.setattr(transformers.Trainer, "training_step", training_step)


def _run(tmp_path, model_dir, data_dir, *sets):
    recipe = {"name": "tiny", "data": {"max_length": 32},
              "training": {"max_steps": 8, "per_device_train_batch_size": 8, "learning_rate": 5e-3,
                           "logging_steps": 2, "eval_strategy": "no", "save_steps": 100, "use_cpu": True,
                           "disable_tqdm": True},
              "pruning": None}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    argv = ["run", str(path), "--model", str(model_dir), "--data-dir", str(data_dir),
            "--results-dir", str(tmp_path / "results")]
    for item in sets:
        argv += ["--set", item]
    return main(argv)


def test_nan_gradient_stops_the_run_naming_the_step_and_nothing_is_exported(
    tmp_path, tiny_model_dir, conll_dir, capsys, monkeypatch
):
    _inject_nan_grad(monkeypatch, at_step=3)
    assert _run(tmp_path, tiny_model_dir, conll_dir) == 2
    err = capsys.readouterr().err
    assert "prune-trainer: error: non-finite gradient norm nan at optimizer step 3" in err
    out_dir = tmp_path / "results" / "tiny"
    assert not (out_dir / "model").exists() and not (out_dir / "metrics.json").exists()
    assert not (out_dir / ".lock").exists()


def test_huge_learning_rate_diverges_into_a_clear_error(tmp_path, tiny_model_dir, conll_dir, capsys):
    assert _run(tmp_path, tiny_model_dir, conll_dir, "training.learning_rate=1e10") == 2
    assert "non-finite" in capsys.readouterr().err
    assert not (tmp_path / "results" / "tiny" / "metrics.json").exists()
    assert not (tmp_path / "results" / "tiny" / "model").exists()


def test_skip_zeroes_the_bad_step_and_training_goes_on(tmp_path, monkeypatch):
    _inject_nan_grad(monkeypatch, at_step=4)
    guard = FiniteCheckCallback("skip")
    model = tiny_bert()
    with pytest.warns(UserWarning, match="optimizer step 4: its gradients were zeroed"):
        make_trainer(tmp_path, model, [guard], max_steps=6).train()
    assert guard.skipped_steps == [4]
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_nonfinite_loss_is_caught_by_the_forward_hook():
    guard = FiniteCheckCallback()
    model = tiny_bert()
    guard.on_train_begin(None, None, None, model=model)
    guard._record_loss(model, (), {"loss": torch.tensor(float("inf"))})
    state = transformers.TrainerState()
    state.global_step = 6
    with pytest.raises(FloatingPointError, match="non-finite loss inf at optimizer step 7"):
        guard.on_pre_optimizer_step(None, state, None, model=model)
    with pytest.raises(ValueError, match="on_nonfinite must be one of"):
        FiniteCheckCallback("ignore")


def test_recipe_on_nonfinite_skip_reaches_the_callback(tmp_path, tiny_model_dir, conll_dir, monkeypatch):
    _inject_nan_grad(monkeypatch, at_step=2)
    with pytest.warns(UserWarning, match="optimizer step 2"):
        assert _run(tmp_path, tiny_model_dir, conll_dir, "on_nonfinite=skip") == 0
    metrics = json.loads((tmp_path / "results" / "tiny" / "metrics.json").read_text())
    assert metrics["train_steps"] == 8 and metrics["config"]["on_nonfinite"] == "skip"
