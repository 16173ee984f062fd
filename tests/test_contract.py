"""The method contract: one hook per method, registration, the Taylor method, NaN-safe masks and selection."""

import math
from dataclasses import dataclass

import pytest
import torch
from helpers import make_trainer, tiny_bert
from torch import nn

import prune_trainer
from prune_trainer import (
    MagnitudePruningCallback,
    Options,
    PruningCallback,
    PruningConfig,
    TaylorPruningCallback,
    register_method,
)
from prune_trainer.callbacks.registry import PRUNING_CALLBACKS
from prune_trainer.masking import MaskedLinear, global_topk_masks, nm_mask, select_masks, topk_mask
from prune_trainer.methods.taylor import accumulate, taylor_importance


def test_every_public_name_is_importable_from_the_top():
    for name in prune_trainer.__all__:
        assert getattr(prune_trainer, name) is not None, name
    for name in ("MovementPruningCallback", "OBERTPruningCallback", "NMSparsityCallback", "DistillationCallback",
                 "TaylorPruningCallback", "SparsityLoggingCallback", "export_pruned_model", "run_oneshot",
                 "load_conll_splits", "MovementOptions", "OBERTOptions", "NMOptions", "TaylorOptions"):
        assert name in prune_trainer.__all__, name


def test_the_api_page_lists_each_public_name_once():
    """docs/api.md: one table row per name (merges had left stale second rows)."""
    from collections import Counter
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    rows = [line.split("|")[1].strip() for line in page.splitlines() if line.startswith("| `")]
    assert [name for name, n in Counter(rows).items() if n > 1] == []


@dataclass
class RandomOptions(Options):
    section = "random options"
    seed: int = 0


class RandomPruningCallback(PruningCallback):
    """A method in a dozen lines: random scores through the base class's selection."""

    method_name = "random-test"
    options_class = RandomOptions

    def compute_masks(self, step, target, context):
        gen = torch.Generator().manual_seed(self.options.seed + step)
        scores = {n: torch.rand(layer.weight.shape, generator=gen) for n, layer in self.layers.items()}
        return self.select(scores, target)


@pytest.fixture
def registered_random():
    register_method(RandomPruningCallback)
    yield RandomPruningCallback
    PRUNING_CALLBACKS.pop("random-test")


def test_a_new_method_is_one_hook_and_one_registration(registered_random, tmp_path):
    cfg = PruningConfig.from_dict({"method": "random-test", "options": {"seed": 3},
                                   "schedule": {"final_sparsity": 0.6, "start_step": 2, "end_step": 8, "frequency": 2}})
    model = tiny_bert()
    pruner = prune_trainer.make_pruning_callback(model, cfg)
    make_trainer(tmp_path, model, [pruner], max_steps=10).train()
    assert pruner.sparsity()[0] == pytest.approx(0.6, abs=1e-3)
    assert pruner.pruning_steps == 4 and pruner.last_pruned_step == 8
    for layer in pruner.layers.values():  # the base class kept the pruned weights at exactly zero
        assert bool((layer.weight[~layer.weight_mask] == 0).all())
    with pytest.raises(ValueError, match="random options: unknown key 'sed'"):
        PruningConfig.from_dict({"method": "random-test", "options": {"sed": 1}})


def test_registering_a_name_twice_is_an_error(registered_random):
    with pytest.raises(ValueError, match="'random-test' is already registered"):
        register_method(RandomPruningCallback)
    with pytest.raises(ValueError, match="'magnitude' is already registered"):
        register_method(MagnitudePruningCallback)


def test_overrides_are_routed_and_unknown_ones_named():
    pruner = MagnitudePruningCallback(tiny_bert(), final_sparsity=0.7, scope="layer", end_step=0.5)
    assert pruner.config.schedule.final_sparsity == 0.7 and pruner.config.scope == "layer"
    with pytest.raises(ValueError, match=r"unknown key 'final_sparsiti'; did you mean 'final_sparsity'\?"):
        MagnitudePruningCallback(tiny_bert(), final_sparsiti=0.7)
    with pytest.raises(ValueError, match="runs method 'magnitude', got a config for 'movement'"):
        MagnitudePruningCallback(tiny_bert(), PruningConfig(method="movement"))


def test_logger_is_given_the_pruner_and_reads_its_target():
    pruner = MagnitudePruningCallback(tiny_bert(), final_sparsity=0.5, start_step=0, end_step=2, frequency=1)
    pruner.schedule = pruner.config.schedule.resolve(4)
    pruner.prune(2)
    logs = prune_trainer.SparsityLoggingCallback(pruner).sparsity_logs()
    assert logs["sparsity/target"] == 0.5 and logs["sparsity/global"] == pytest.approx(0.5, abs=1e-3)
    with pytest.raises(TypeError, match="takes the pruning callback"):
        prune_trainer.SparsityLoggingCallback(tiny_bert())


# ---- Taylor ------------------------------------------------------------------------------------------------
def test_taylor_importance_and_accumulation():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    g = torch.tensor([[-3.0, 1.0], [2.0, 7.0]])
    torch.testing.assert_close(taylor_importance(w, g), torch.tensor([[3.0, 2.0], [1.0, 0.0]]))
    torch.testing.assert_close(taylor_importance(w, g, power=2), torch.tensor([[9.0, 4.0], [1.0, 0.0]]))
    total = torch.zeros(3)
    steps = [torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 1.0]), torch.tensor([2.0, 5.0, 2.0])]
    for i, imp in enumerate(steps):
        accumulate(total, imp, i)
    torch.testing.assert_close(total, torch.stack(steps).mean(0))
    ema = torch.zeros(3)
    for i, imp in enumerate(steps):
        accumulate(ema, imp, i, ema=0.5)
    torch.testing.assert_close(ema, 0.25 * steps[0] + 0.25 * steps[1] + 0.5 * steps[2])


class GradRecorder(prune_trainer.callbacks.base.TrainerCallback):
    """Running mean of |w·g| per weight over the optimizer steps before the first pruning step."""

    def __init__(self, pruner):
        self.pruner, self.count = pruner, 0
        self.means = {n: torch.zeros_like(layer.weight) for n, layer in pruner.layers.items()}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.pruner.last_pruned_step >= 0:
            return
        for n, layer in self.pruner.layers.items():
            accumulate(self.means[n], (layer.weight.grad * layer.weight).abs(), self.count)
        self.count += 1


def test_taylor_prunes_the_lowest_mean_first_order_importance(tmp_path):
    model = tiny_bert()
    pruner = TaylorPruningCallback(model, final_sparsity=0.5, kind="oneshot", start_step=6)
    rec = GradRecorder(pruner)
    make_trainer(tmp_path, model, [rec, pruner], max_steps=12).train()
    assert rec.count == 6 and pruner.last_pruned_step == 6
    expected = select_masks(rec.means, 0.5, "global", "unstructured", pruner.config.min_kept_fraction)
    for name, layer in pruner.layers.items():
        assert torch.equal(layer.weight_mask, expected[name]), name


class StopAfter(prune_trainer.callbacks.base.TrainerCallback):
    """Stops the run at ``step`` (after that step's pruning), so the masks can be compared with the recorder."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_taylor_without_gradients_is_a_clear_error():
    pruner = TaylorPruningCallback(tiny_bert(), final_sparsity=0.5, kind="oneshot", start_step=0)
    pruner.schedule = pruner.config.schedule.resolve(10)
    with pytest.raises(ValueError, match="has seen no gradient yet"):
        pruner.prune(0)


def test_taylor_resume_equals_the_uninterrupted_run(tmp_path):
    common = dict(max_steps=12, save_strategy="steps", save_steps=5, learning_rate=1e-3)
    sched = dict(final_sparsity=0.6, start_step=2, end_step=10, frequency=4)
    full_model = tiny_bert()
    full = TaylorPruningCallback(full_model, **sched)
    make_trainer(tmp_path / "full", full_model, [full], **common).train()

    part_model = tiny_bert()
    make_trainer(tmp_path / "part", part_model, [TaylorPruningCallback(part_model, **sched), StopAfter(7)],
                 **common).train()
    resumed_model = tiny_bert(seed=5)
    resumed = TaylorPruningCallback(resumed_model, **sched)
    make_trainer(tmp_path / "part", resumed_model, [resumed], **common).train(resume_from_checkpoint=True)
    for name, layer in full.layers.items():
        assert torch.equal(layer.weight_mask, resumed.layers[name].weight_mask), name


# ---- NaN / inf safety ------------------------------------------------------------------------------------
def test_masks_give_exact_zeros_whatever_the_pruned_value():
    layer = MaskedLinear.from_linear(nn.Linear(4, 2))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[math.nan, 1.0, math.inf, -math.inf], [2.0, math.nan, 3.0, 4.0]]))
    mask = torch.tensor([[False, True, False, False], [True, False, True, True]])
    layer.set_mask(mask)
    assert torch.equal(layer.weight, torch.tensor([[0.0, 1.0, 0.0, 0.0], [2.0, 0.0, 3.0, 4.0]]))
    layer.weight.grad = torch.full((2, 4), math.nan)
    layer.mask_grad()
    assert bool((layer.weight.grad[~mask] == 0).all())
    with torch.no_grad():
        layer.weight[0, 0] = math.nan
    assert bool((layer.to_linear().weight[~mask] == 0).all())


def test_selection_never_keeps_non_finite_scores_over_finite_ones():
    scores = torch.tensor([[math.nan, 0.1, math.inf, 0.2], [-math.inf, 0.3, 0.05, math.nan]])
    kept = topk_mask(scores, 0.5)
    assert kept.tolist() == [[False, True, False, True], [False, True, True, False]]
    glob = global_topk_masks({"a": scores, "b": torch.tensor([[0.01, math.nan]])}, 0.6)
    assert glob["a"].tolist() == [[False, True, False, True], [False, True, True, False]]  # the 4 finite tops
    assert glob["b"].tolist() == [[False, False]]
    nm = nm_mask(scores, 2, 4)
    assert nm.tolist() == [[False, True, False, True], [False, True, True, False]]


def test_oneshot_config_is_typed_and_checks_the_pruner_options():
    from prune_trainer import OneShotConfig

    assert OneShotConfig(model="m", method="obs", options={"lazy": 64}).options == {"lazy": 64}
    with pytest.raises(ValueError, match=r"obs pruner options: unknown key 'lazzy'; did you mean 'lazy'\?"):
        OneShotConfig(model="m", method="obs", options={"lazzy": 64})
    with pytest.raises(ValueError, match="calib_samples must be int, got 'many'"):
        OneShotConfig(model="m", calib_samples="many")
