"""OBERTPruningCallback on a plain Trainer: schedule, exact zeros, sampler hygiene, layer groups, resume, LR rewind."""

import pytest
import torch
from helpers import make_trainer, tiny_bert, tiny_datasets
from transformers import DataCollatorForTokenClassification, TrainerCallback

from prune_trainer.callbacks.obert import OBERTPruningCallback, RewindLambda
from prune_trainer.callbacks.registry import make_pruning_callback
from prune_trainer.config import PruningConfig
from prune_trainer.methods.obert.sampler import GradientSampler

OPTS = dict(num_grads=8, block_size=8, grad_batch_size=4, grad_chunk=3, verbose=False)
SCHEDULE = dict(kind="cubic", initial_sparsity=0.5, final_sparsity=0.8, start_step=0, end_step=12, frequency=4)


def _pruner(model, **kw):
    return OBERTPruningCallback(model, **{**OPTS, **SCHEDULE, **kw})


class ZeroChecker(TrainerCallback):
    def __init__(self, pruner):
        self.pruner, self.previous, self.lrs = pruner, None, []

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        masks = {}
        for name, layer in self.pruner.layers.items():
            assert bool((layer.weight[~layer.weight_mask] == 0).all()), f"revived weight in {name}"
            masks[name] = layer.weight_mask.clone()
            if self.previous is not None:
                assert bool((masks[name] <= self.previous[name]).all()), "a pruned weight came back"
        self.previous = masks
        self.lrs.append(optimizer.param_groups[0]["lr"])


def _sampler(batch_size=4, seed=0):
    train, _, tok = tiny_datasets(32)
    return GradientSampler(train, DataCollatorForTokenClassification(tok), batch_size, seed=seed)


def test_trainer_run_follows_schedule_and_keeps_zeros(tmp_path):
    model = tiny_bert()
    pruner = _pruner(model, update="joint")
    checker = ZeroChecker(pruner)
    make_trainer(tmp_path, model, [pruner, checker], max_steps=16).train()
    assert pruner.sparsity()[0] == pytest.approx(0.8, abs=1e-3)
    assert [round(s["sparsity"], 4) for s in pruner.stats] == [
        round(pruner.schedule.target(t), 4) for t in (0, 4, 8, 12)
    ]
    assert pruner.last_pruned_step == 12
    zeros = sum(int((layer.weight == 0).sum()) for layer in pruner.layers.values())
    assert zeros / sum(layer.weight.numel() for layer in pruner.layers.values()) >= 0.8 - 1e-3


def test_registry_and_method_kwargs_validation():
    model = tiny_bert()
    cfg = PruningConfig(method="obert", schedule=SCHEDULE, options={"num_grads": 4, "block_size": 3})
    cb = make_pruning_callback(model, cfg)
    assert isinstance(cb, OBERTPruningCallback) and cb.options.block_size == 3
    with pytest.raises(ValueError, match="fisher_blocks"):
        OBERTPruningCallback(tiny_bert(), PruningConfig(method="obert", options={"fisher_blocks": 2}))
    with pytest.raises(ValueError, match="'sum'"):
        OBERTPruningCallback(tiny_bert(), update="sum")


def test_sampler_gradient_is_the_model_loss_gradient_and_state_is_restored():
    model = tiny_bert()
    model.train()
    sampler = _sampler()
    params = [model.bert.encoder.layer[0].intermediate.dense.weight, model.bert.encoder.layer[1].output.dense.weight]
    # Simulate the Trainer mid-step: accumulated grads present, a frozen parameter, a known RNG stream.
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    model.bert.embeddings.word_embeddings.weight.requires_grad_(False)
    grads_before = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    got = list(sampler.sample(model, params, num_batches=2, round_key=7))
    assert torch.equal(torch.rand(3), expected_next)  # global RNG untouched
    assert model.training
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if "word_embeddings" not in n)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads_before[n]), n
    # Independent computation: eval-mode loss gradient on the same collated batch.
    batch = sampler._batch(sampler.batch_indices(2, 7)[1], torch.device("cpu"))
    model.eval()
    ref = torch.autograd.grad(model(**batch).loss, params)
    model.train()
    for g, r in zip(got[1], ref, strict=True):
        torch.testing.assert_close(g, r.reshape(-1))


def test_sampler_shards_are_disjoint_and_cover_the_single_process_draw():
    train, _, tok = tiny_datasets(32)
    coll = DataCollatorForTokenClassification(tok)
    single = GradientSampler(train, coll, 4, seed=1, rank=0, world_size=1).batch_indices(6, 3)
    shards = [GradientSampler(train, coll, 4, seed=1, rank=r, world_size=2).batch_indices(3, 3) for r in range(2)]
    assert sorted(map(tuple, shards[0] + shards[1])) == sorted(map(tuple, single))
    assert not set(map(tuple, shards[0])) & set(map(tuple, shards[1]))


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_layer_by_layer_processing_matches_all_at_once(scope):
    results = []
    for lpp in (None, 5):  # 12 target layers: groups of 5, 5, 2
        model = tiny_bert(seed=4)
        cb = _pruner(model, layers_per_pass=lpp, scope=scope, sampler=_sampler())
        cb.prune_step(0.5, step=0)
        cb.current_target = 0.5
        cb.prune_step(0.7, step=4)
        results.append(cb.layers)
    for name, layer in results[0].items():
        assert torch.equal(layer.weight_mask, results[1][name].weight_mask), name
        torch.testing.assert_close(layer.weight, results[1][name].weight, rtol=1e-4, atol=1e-6)


def test_num_recomputations_and_update_modes_reach_the_target():
    for kw in ({"num_recomputations": 3}, {"update": "summed"}, {"update": "none"}, {"fisher_form": "woodbury"},
               {"block_size": 1}, {"fisher_dtype": "bfloat16"}):
        model = tiny_bert(seed=2)
        cb = _pruner(model, sampler=_sampler(), **kw)
        cb.prune_step(0.6)
        assert cb.sparsity()[0] == pytest.approx(0.6, abs=1e-3), kw
        assert len(cb.stats) == kw.get("num_recomputations", 1)
        for layer in cb.layers.values():
            assert bool((layer.weight[~layer.weight_mask] == 0).all())


def test_obs_update_changes_only_the_remaining_weights_of_touched_blocks():
    model = tiny_bert(seed=5)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    cb = _pruner(model, sampler=_sampler(), update="none")
    cb.prune_step(0.5)
    for name, layer in cb.layers.items():  # update="none": kept weights untouched
        w0 = base[name + ".weight"]
        assert torch.equal(layer.weight[layer.weight_mask], w0[layer.weight_mask])
    model2 = tiny_bert(seed=5)
    cb2 = _pruner(model2, sampler=_sampler(), update="joint")
    cb2.prune_step(0.5)
    changed = sum(
        int((layer.weight != base[n + ".weight"])[layer.weight_mask].sum()) for n, layer in cb2.layers.items()
    )
    assert changed > 0


def test_resume_restores_schedule_masks_and_weights(tmp_path):
    common = dict(max_steps=16, save_strategy="steps", save_steps=6)
    full_model = tiny_bert(seed=3)
    full = _pruner(full_model)
    make_trainer(tmp_path / "full", full_model, [full], **common).train()

    class StopAt6(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 6:
                control.should_training_stop = True

    part_model = tiny_bert(seed=3)
    make_trainer(tmp_path / "part", part_model, [_pruner(part_model), StopAt6()], **common).train()
    resumed_model = tiny_bert(seed=99)
    resumed = _pruner(resumed_model)
    seen = {}

    class Probe(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen.update(step=state.global_step, last=resumed.last_pruned_step, target=resumed.current_target)

    make_trainer(tmp_path / "part", resumed_model, [resumed, Probe()], **common).train(resume_from_checkpoint=True)
    assert seen["step"] == 6 and seen["last"] == 4
    assert seen["target"] == pytest.approx(full.schedule.target(4))
    assert [s["sparsity"] for s in resumed.stats] == [s["sparsity"] for s in full.stats]
    for name, layer in full.layers.items():
        assert torch.equal(layer.weight_mask, resumed.layers[name].weight_mask), name
        torch.testing.assert_close(layer.weight, resumed.layers[name].weight, atol=1e-5, rtol=1e-4)


def test_lr_rewind_restarts_the_learning_rate_at_each_pruning_step(tmp_path):
    fn = RewindLambda([0, 4, 8, 16])
    assert [fn(t) for t in (0, 2, 4, 6, 8, 12, 16)] == [1.0, 0.5, 1.0, 0.5, 1.0, 0.5, 0.0]
    model = tiny_bert()
    pruner = _pruner(model, lr_rewind=True)
    checker = ZeroChecker(pruner)
    make_trainer(tmp_path, model, [pruner, checker], max_steps=16, learning_rate=1e-3).train()
    # lrs[i] is the LR after optimizer step i+1 (scheduler stepped): sawtooth with teeth at 0, 4, 8, 12.
    expected = [1e-3 * RewindLambda([0, 4, 8, 12, 16])(t) for t in range(1, 17)]
    assert checker.lrs == pytest.approx(expected)


def test_lr_rewind_resume_equals_the_uninterrupted_run(tmp_path):
    """The rewind multiplier is in the saved scheduler state; resuming loads it with ``weights_only=True``."""
    common = dict(max_steps=16, save_strategy="steps", save_steps=6, learning_rate=1e-3)
    full_model = tiny_bert(seed=3)
    full = _pruner(full_model, lr_rewind=True)
    full_lrs = ZeroChecker(full)
    make_trainer(tmp_path / "full", full_model, [full, full_lrs], **common).train()
    saved = torch.load(tmp_path / "full" / "checkpoint-6" / "scheduler.pt", weights_only=True)
    assert saved["lr_lambdas"] == [{"points": [0, 4, 8, 12, 16]}] * 2  # plain data only (decay, no-decay groups)

    class StopAt6(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 6

    part_model = tiny_bert(seed=3)
    make_trainer(tmp_path / "part", part_model, [_pruner(part_model, lr_rewind=True), StopAt6()], **common).train()
    resumed_model = tiny_bert(seed=99)
    resumed = _pruner(resumed_model, lr_rewind=True)
    resumed_lrs = ZeroChecker(resumed)
    make_trainer(tmp_path / "part", resumed_model, [resumed, resumed_lrs], **common).train(resume_from_checkpoint=True)
    assert resumed_lrs.lrs == pytest.approx(full_lrs.lrs[6:])
    for name, layer in full.layers.items():
        assert torch.equal(layer.weight_mask, resumed.layers[name].weight_mask), name
        torch.testing.assert_close(layer.weight, resumed.layers[name].weight, atol=1e-5, rtol=1e-4)
