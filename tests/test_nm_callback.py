"""NMSparsityCallback: N:M holds after every optimizer step, masks stay frozen, SR-STE math, shape errors."""

from types import SimpleNamespace

import pytest
import torch
from helpers import make_trainer, tiny_bert, tiny_datasets
from transformers import DataCollatorForTokenClassification, TrainerCallback

from prune_trainer.callbacks.nm import NMSparsityCallback
from prune_trainer.callbacks.registry import make_pruning_callback
from prune_trainer.config import PruningConfig
from prune_trainer.masking.inject import masked_layers
from prune_trainer.masking.masked_linear import MaskedLinear
from prune_trainer.schedules.schedule import PruningSchedule


def groups_nonzeros(weight: torch.Tensor, m: int) -> torch.Tensor:
    """Independent count: non-zeros per group of m consecutive input weights (Python-level reshape)."""
    rows = weight.detach().tolist()
    return torch.tensor([[sum(v != 0 for v in row[j : j + m]) for j in range(0, len(row), m)] for row in rows])


def top_n_per_group(weight: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Independent N:M magnitude mask via argsort (not topk)."""
    out_f, in_f = weight.shape
    groups = weight.detach().abs().reshape(out_f, in_f // m, m)
    order = groups.argsort(dim=-1, descending=True, stable=True)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(-1, order[..., :n], True)
    return keep.reshape(out_f, in_f)


def nm_config(pattern="2:4", start_step=0, **method_kwargs):
    return PruningConfig(
        method="nm",
        schedule=PruningSchedule(kind="oneshot", start_step=start_step),
        pattern=pattern,
        options=method_kwargs,
    )


class NMChecker(TrainerCallback):
    """Before pruning: dense. After every optimizer step once pruned: ≤ N non-zeros per group of M, pruned
    weights exactly 0, and (static mode) the mask equal to the first one."""

    def __init__(self, pruner, n, m, start_step, frozen=True):
        self.pruner, self.n, self.m, self.start, self.frozen = pruner, n, m, start_step, frozen
        self.first_masks = None
        self.checked = 0
        self.masks_seen = []
        self.weights_at_start = None

    def on_step_begin(self, args, state, control, **kwargs):
        # runs before the pruner (listed first): the weights the mask is computed from
        if state.global_step == self.start:
            self.weights_at_start = {n: layer.weight.detach().clone() for n, layer in self.pruner.layers.items()}

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step  # already incremented: `step` optimizer steps are done
        for name, layer in self.pruner.layers.items():
            if step <= self.start:
                assert bool(layer.weight_mask.all()), f"{name} pruned during the dense warm-up (step {step})"
                continue
            counts = groups_nonzeros(layer.weight, self.m)
            assert int(counts.max()) <= self.n, f"{name}: a group holds {int(counts.max())} > {self.n} at {step}"
            assert bool((layer.weight[~layer.weight_mask] == 0).all())
        if step > self.start:
            masks = {n: layer.weight_mask.clone() for n, layer in self.pruner.layers.items()}
            self.masks_seen.append(masks)
            if self.first_masks is None:
                self.first_masks = masks
            elif self.frozen:
                for name, mask in masks.items():
                    assert torch.equal(mask, self.first_masks[name]), f"mask of {name} changed at step {step}"
        self.checked += 1


@pytest.mark.parametrize(
    "pattern,start,extra",
    [("2:4", 0, {}), ("1:4", 3, {}), ("2:4", 2, {"gradient_accumulation_steps": 2})],
    ids=["2:4-at-start", "1:4-after-warmup", "2:4-grad-accum"],
)
def test_nm_holds_after_every_optimizer_step_and_mask_is_frozen(tmp_path, pattern, start, extra):
    n, m = map(int, pattern.split(":"))
    model = tiny_bert()
    pruner = NMSparsityCallback(model, nm_config(pattern, start_step=start))
    checker = NMChecker(pruner, n, m, start)
    make_trainer(tmp_path, model, [checker, pruner], max_steps=8, **extra).train()
    assert checker.checked == 8
    # the frozen mask is the magnitude N:M mask of the weights at the start step (independent argsort)
    for name, layer in pruner.layers.items():
        assert torch.equal(layer.weight_mask, top_n_per_group(checker.weights_at_start[name], n, m)), name
    global_s, _ = pruner.sparsity()
    assert global_s == pytest.approx(1 - n / m)


def test_wanda_score_runs_in_trainer(tmp_path):
    model = tiny_bert()
    pruner = NMSparsityCallback(model, nm_config(score="wanda", calib_batches=2))
    checker = NMChecker(pruner, 2, 4, 0)
    make_trainer(tmp_path, model, [checker, pruner], max_steps=4).train()
    assert checker.checked == 4 and pruner._input_norms is not None


def test_srste_masks_move_then_freeze(tmp_path):
    model = tiny_bert()
    pruner = NMSparsityCallback(model, nm_config(dynamic="srste", freeze_step=0.75, srste_decay=1e-3))
    checker = NMChecker(pruner, 2, 4, 0, frozen=False)
    make_trainer(tmp_path, model, [checker, pruner], max_steps=12, learning_rate=2e-2).train()
    seen = checker.masks_seen
    assert len(seen) == 12
    changed = [any(not torch.equal(a[k], b[k]) for k in a) for a, b in zip(seen[:-1], seen[1:], strict=True)]
    assert any(changed[:8]), "SR-STE never changed a mask before the freeze step"
    assert not any(changed[9:]), "mask changed after freeze_step"
    assert pruner.frozen and pruner.dense is None


def test_srste_update_equation():
    """One step by hand: W_dense ← W − lr·(g(W̃) + λ(¬M)⊙W), then M from |W_dense|, and W = W_dense ⊙ M."""
    torch.manual_seed(0)
    model = tiny_bert()
    lam, lr = 0.5, 0.1
    pruner = NMSparsityCallback(model, nm_config(dynamic="srste", srste_decay=lam))
    state = SimpleNamespace(global_step=0, max_steps=10, is_world_process_zero=True)
    args = SimpleNamespace(output_dir="unused")
    pruner.on_train_begin(args, state, None)
    w0 = {n: layer.weight.detach().clone() for n, layer in pruner.layers.items()}
    pruner.on_step_begin(args, state, None)
    mask0 = {n: layer.weight_mask.clone() for n, layer in pruner.layers.items()}
    for name, layer in pruner.layers.items():  # forward runs on W̃ = W ⊙ M
        assert torch.equal(layer.weight.detach(), w0[name] * mask0[name])
    ids = torch.randint(5, 30, (2, 7))
    model(input_ids=ids, labels=torch.randint(0, 9, (2, 7))).loss.backward()
    grads = {n: layer.weight.grad.clone() for n, layer in pruner.layers.items()}
    assert any(bool((g[~mask0[n]] != 0).any()) for n, g in grads.items()), "STE: pruned weights get gradients"
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    pruner.on_pre_optimizer_step(args, state, None)
    opt.step()
    pruner.on_optimizer_step(args, state, None)
    for name, layer in pruner.layers.items():
        expected = w0[name] - lr * (grads[name] + lam * (~mask0[name]).float() * w0[name])
        torch.testing.assert_close(pruner.dense[name], expected)
        new_mask = top_n_per_group(expected, 2, 4)
        assert torch.equal(layer.weight_mask, new_mask)
        torch.testing.assert_close(layer.weight.detach(), expected * new_mask)


def test_incompatible_layers_error_names_them_and_leaves_model_alone():
    model = tiny_bert(hidden_size=30, intermediate_size=64)  # in_features 30 is not a multiple of 4
    with pytest.raises(ValueError, match=r"in_features divisible by 4.*attention\.self\.query.*30"):
        NMSparsityCallback(model, nm_config())
    assert not masked_layers(model)


def test_incompatible_layers_skipped_when_asked(tmp_path):
    model = tiny_bert(hidden_size=30, intermediate_size=64)
    pruner = NMSparsityCallback(model, nm_config(on_incompatible="skip"))
    assert pruner.skipped_layers and all("output.dense" in n and "attention" not in n for n in pruner.layers)
    make_trainer(tmp_path, model, [pruner], max_steps=3).train()
    for name in pruner.skipped_layers:
        layer = model.get_submodule(name)
        assert not isinstance(layer, MaskedLinear) and bool((layer.weight != 0).all()), f"{name} was pruned"
    for name, layer in pruner.layers.items():
        assert int(groups_nonzeros(layer.weight, 4).max()) <= 2, name
    assert pruner.export_info()["skipped_layers"] == pruner.skipped_layers


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"schedule": {"kind": "cubic"}, "pattern": "2:4"}, "oneshot"),
        ({"options": {"score": "fisher"}}, "score must be 'magnitude'"),
        ({"options": {"bogus": 1}}, "nm options: unknown key .bogus."),
        ({"options": {"score": "obert", "block_size": 6}}, "multiple of M=4"),
        ({"options": {"score": "obert", "dynamic": "srste"}}, "cannot be combined"),
        ({"schedule": {"kind": "oneshot"}, "pattern": "4:4"}, "0 < N < M"),
    ],
)
def test_config_errors(kwargs, match):
    kwargs.setdefault("schedule", {"kind": "oneshot"})
    with pytest.raises(ValueError, match=match):
        NMSparsityCallback(tiny_bert(), PruningConfig(method="nm", **kwargs))


def test_registry_builds_nm_and_defaults_to_2_4():
    model = tiny_bert()
    cb = make_pruning_callback(model, PruningConfig(method="nm", schedule=PruningSchedule(kind="oneshot")))
    assert isinstance(cb, NMSparsityCallback)
    assert (cb.n, cb.m) == (2, 4) and cb.schedule.final_sparsity == 0.5
    assert all(isinstance(m, MaskedLinear) for m in cb.layers.values())


def test_static_mask_survives_checkpoint_resume(tmp_path):
    model = tiny_bert()
    pruner = NMSparsityCallback(model, nm_config(start_step=1))
    make_trainer(tmp_path, model, [pruner], max_steps=4, save_strategy="steps", save_steps=4).train()
    masks = {n: layer.weight_mask.clone() for n, layer in pruner.layers.items()}
    model2 = tiny_bert(seed=1)
    pruner2 = NMSparsityCallback(model2, nm_config(start_step=1))
    make_trainer(tmp_path, model2, [pruner2], max_steps=6, save_strategy="no").train(resume_from_checkpoint=True)
    assert pruner2.last_pruned_step == 1  # restored, not recomputed
    for name, layer in pruner2.layers.items():
        assert torch.equal(layer.weight_mask, masks[name]), name


def test_calibration_uses_plain_loader_of_trainer_dataset():
    from prune_trainer.methods.nm_scores import calibration_batches

    train_ds, _, tok = tiny_datasets(16)
    loader = torch.utils.data.DataLoader(train_ds, batch_size=4, collate_fn=DataCollatorForTokenClassification(tok))
    batches = list(calibration_batches(loader, 3))
    assert len(batches) == 3 and all(b["input_ids"].shape[0] == 4 for b in batches)


def test_srste_resume_restores_dense_weights(tmp_path):
    """A checkpoint saved mid-run (mask still moving) carries the dense weights; resuming reloads them."""
    model = tiny_bert()
    pruner = NMSparsityCallback(model, nm_config(dynamic="srste"))
    saved = {}

    class Grab(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == 3:
                saved.update({n: t.clone() for n, t in pruner.dense.items()})
                control.should_training_stop = True

    make_trainer(tmp_path / "b", model, [pruner, Grab()], max_steps=8, save_strategy="steps", save_steps=3).train()
    assert saved and (tmp_path / "b" / "checkpoint-3" / "nm_dense_weights.pt").is_file()
    model2 = tiny_bert(seed=3)
    pruner2 = NMSparsityCallback(model2, nm_config(dynamic="srste"))
    restored = {}

    class AtBegin(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            restored.update({n: t.clone() for n, t in pruner2.dense.items()})

    trainer = make_trainer(tmp_path / "b", model2, [pruner2, AtBegin()], max_steps=8, save_strategy="no")
    trainer.train(resume_from_checkpoint=True)
    for name, dense in saved.items():
        torch.testing.assert_close(restored[name], dense)
    assert pruner2.frozen and pruner2.dense is None


@pytest.mark.parametrize("score", ["magnitude", "wanda", "obert"])
def test_nm_recipes_load_and_build(score):
    from pathlib import Path

    from prune_trainer.recipes.runner import load_recipe

    recipe = load_recipe(Path(__file__).parents[1] / "recipes" / f"nm_2_4_{score}.yaml")
    assert recipe["name"] == f"nm_2_4_{score}" and recipe["distillation"]["teacher"] == "init_from"
    cb = make_pruning_callback(tiny_bert(), PruningConfig.from_dict(recipe["pruning"]))
    assert isinstance(cb, NMSparsityCallback) and cb.options.score == score and (cb.n, cb.m) == (2, 4)
