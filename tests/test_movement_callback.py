"""`MovementPruningCallback` inside a plain `Trainer`: schedule, optimizer groups, soft λ, resume, export."""

import json
import shutil

import pytest
import torch
from helpers import make_trainer, tiny_bert, tiny_tokenizer
from safetensors.torch import load_file
from transformers import AutoModelForTokenClassification, TrainerCallback

from prune_trainer.callbacks.movement import SCORE_GROUP_KEY, MovementPruningCallback, unwrap_optimizer
from prune_trainer.config import PruningConfig
from prune_trainer.export import export_pruned_model


def _no_dropout_bert():
    return tiny_bert(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


class Recorder(TrainerCallback):
    """Per step: masks, scores, score-group and group-0 LRs, score grads right before the optimizer step."""

    def __init__(self, pruner):
        self.pruner = pruner
        self.steps = {}
        self.grads = {}

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        self.grads[state.global_step] = [p.grad.clone() for p in self.pruner.score_params()]

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        opt = unwrap_optimizer(optimizer)
        score_group = next(g for g in opt.param_groups if g.get(SCORE_GROUP_KEY))
        self.steps[state.global_step] = {
            "masks": {n: layer.weight_mask.clone() for n, layer in self.pruner.layers.items()},
            "scores": [p.detach().clone() for p in self.pruner.score_params()],
            "weights": {n: layer.weight.detach().clone() for n, layer in self.pruner.layers.items()},
            "lr0": (opt.param_groups[0]["lr"], opt.param_groups[0]["initial_lr"]),
            "score_lr": score_group["lr"],
        }


def _hard(model, **overrides):
    kwargs = dict(variant="hard", final_sparsity=0.8, start_step=2, end_step=8, frequency=1, scope="layer")
    kwargs.update(overrides)
    return MovementPruningCallback(model, **kwargs)


def test_hard_hits_the_scheduled_sparsity_exactly_and_scores_follow_the_lr_schedule(tmp_path):
    model = _no_dropout_bert()
    pruner = _hard(model, score_lr=0.02)
    rec = Recorder(pruner)
    trainer = make_trainer(tmp_path, model, [pruner, rec], max_steps=10, lr_scheduler_type="linear")
    trainer.train()
    schedule = pruner.schedule
    assert (schedule.start_step, schedule.end_step) == (2, 8)
    for step, seen in rec.steps.items():
        for name, mask in seen["masks"].items():
            assert int((~mask).sum()) == round(schedule.target(step) * mask.numel()), (step, name)
        lr0, initial0 = seen["lr0"]
        assert seen["score_lr"] == pytest.approx(0.02 * lr0 / initial0)  # the Trainer's schedule drives the scores
    assert rec.steps[1]["masks"][next(iter(pruner.layers))].all()  # initial warm-up: nothing pruned
    assert rec.steps[10]["score_lr"] == pytest.approx(0.0)  # linear decay reached 0 at the last step
    # While training, pruned weights keep their values (a weight can come back) ...
    mid = rec.steps[6]
    assert any(bool((mid["weights"][n][~m] != 0).any()) for n, m in mid["masks"].items())
    # ... the mask set really moves with the scores (not monotone) ...
    assert any(not torch.equal(rec.steps[8]["masks"][n], rec.steps[10]["masks"][n]) for n in pruner.layers)
    # ... and at the end the masks are frozen into zeros and the scores dropped.
    assert pruner.finalized and not pruner.score_params()
    assert not any("mask_scores" in n for n, _ in model.named_parameters())
    for name, layer in pruner.layers.items():
        assert torch.equal(layer.weight_mask, rec.steps[10]["masks"][name])
        assert bool((layer.weight[~layer.weight_mask] == 0).all())
    global_sparsity, _ = pruner.sparsity()
    assert global_sparsity == pytest.approx(0.8, abs=1e-3)


def test_global_scope_hits_the_total_exactly(tmp_path):
    model = _no_dropout_bert()
    pruner = _hard(model, scope="global", final_sparsity=0.9)
    rec = Recorder(pruner)
    make_trainer(tmp_path, model, [pruner, rec], max_steps=8).train()
    for step, seen in rec.steps.items():
        pruned = sum(int((~m).sum()) for m in seen["masks"].values())
        total = sum(m.numel() for m in seen["masks"].values())
        assert pruned == round(pruner.schedule.target(step) * total)
        assert all(int(m.sum()) >= round(0.01 * m.numel()) for m in seen["masks"].values())  # floor


def test_scores_have_their_own_lr_and_no_weight_decay_in_the_trainers_optimizer(tmp_path):
    model = _no_dropout_bert()
    pruner = _hard(model, score_lr=0.05, score_init=1.0, start_step=5)
    rec = Recorder(pruner)
    trainer = make_trainer(
        tmp_path, model, [pruner, rec], max_steps=1, lr_scheduler_type="constant", weight_decay=0.5,
        learning_rate=1e-3,
    )
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    groups = opt.param_groups
    score_group = next(g for g in groups if g.get(SCORE_GROUP_KEY))
    assert score_group["weight_decay"] == 0.0 and score_group["initial_lr"] == 0.05
    assert groups[0]["weight_decay"] == 0.5 and groups[0]["lr"] == 1e-3
    # AdamW's first step with no decay: S₁ = S₀ - lr · g / (|g| + eps), exactly (S₀ = 1 would decay otherwise).
    g = rec.grads[0]
    eps = score_group["eps"]
    for s1, grad in zip(rec.steps[1]["scores"], g, strict=True):
        expected = 1.0 - 0.05 * grad / (grad.abs() + eps)
        torch.testing.assert_close(s1, expected, rtol=0, atol=1e-6)
    assert max(float(gr.abs().max()) for gr in g) > 0


def test_scores_are_in_their_own_group_during_training(tmp_path):
    model = _no_dropout_bert()
    pruner = _hard(model)
    seen = {}

    class Check(TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            opt = unwrap_optimizer(optimizer)
            ids = {id(p) for p in pruner.score_params()}
            groups = opt.param_groups
            seen["groups"] = [(bool(g.get(SCORE_GROUP_KEY)), sum(id(p) in ids for p in g["params"])) for g in groups]

    make_trainer(tmp_path, model, [pruner, Check()], max_steps=2).train()
    n_layers = len(pruner.layers)
    assert seen["groups"][-1] == (True, n_layers)
    assert all(count == 0 for flag, count in seen["groups"][:-1])


def _soft_run(tmp_path, lam):
    model = _no_dropout_bert()
    config = PruningConfig(
        method="movement",
        schedule=dict(kind="cubic", final_sparsity=0.9, start_step=0, end_step=10, frequency=1),
        options=dict(variant="soft", score_lr=0.5, final_threshold=0.1, final_lambda=lam),
    )
    pruner = MovementPruningCallback(model, config)
    make_trainer(tmp_path / f"soft_{lam}", model, [pruner], max_steps=14, lr_scheduler_type="constant").train()
    return pruner.sparsity()


def test_soft_sparsity_rises_with_lambda(tmp_path):
    lambdas = (0.0, 0.3, 3.0)
    reached = {lam: _soft_run(tmp_path, lam) for lam in lambdas}
    sparsity = [reached[lam][0] for lam in lambdas]
    assert sparsity[0] < 0.4  # the task gradient alone prunes little
    assert sparsity[0] < sparsity[1] < sparsity[2]
    assert sparsity[2] > 0.9
    assert all(v < 1.0 for _, per_layer in reached.values() for v in per_layer.values())  # floor: none emptied


def test_soft_penalty_enters_the_training_loss_only():
    model = _no_dropout_bert()
    pruner = MovementPruningCallback(model, variant="soft", final_lambda=5.0)
    pruner._hooks.append(model.register_forward_hook(pruner._loss_hook))
    pruner.current_lambda = 2.0
    with torch.no_grad():
        for p in pruner.score_params():
            p.copy_(torch.randn_like(p))
    batch = {"input_ids": torch.tensor([[2, 7, 8, 3]]), "labels": torch.tensor([[-100, 1, 0, -100]])}
    model.eval()
    plain = model(**batch).loss
    model.train()
    with_penalty = model(**batch).loss
    r = torch.stack([torch.sigmoid(p).mean() for p in pruner.score_params()]).mean()
    torch.testing.assert_close(with_penalty, plain + 2.0 * r)


def test_resume_restores_scores_masks_optimizer_and_schedule(tmp_path):
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    common = dict(max_steps=10, save_strategy="steps", save_steps=5, lr_scheduler_type="linear")

    model_a = _no_dropout_bert()
    pruner_a = _hard(model_a)
    rec_a = Recorder(pruner_a)
    make_trainer(run_a, model_a, [pruner_a, rec_a], **common).train()

    ckpt = run_a / "checkpoint-5"
    saved_opt = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(saved_opt["param_groups"]) == 2  # the Trainer's layout: the score group is saved separately
    assert not any(g.get(SCORE_GROUP_KEY) for g in saved_opt["param_groups"])
    assert (ckpt / "movement_optimizer.pt").is_file()
    assert json.loads((ckpt / "pruning_state.json").read_text())["method"] == "movement"
    assert any(k.endswith("mask_scores") for k in load_file(ckpt / "model.safetensors"))

    run_b.mkdir()
    shutil.copytree(ckpt, run_b / "checkpoint-5")
    model_b = tiny_bert(seed=123, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)  # other init
    pruner_b = _hard(model_b)
    rec_b = Recorder(pruner_b)
    make_trainer(run_b, model_b, [pruner_b, rec_b], **common).train(resume_from_checkpoint=True)

    assert sorted(rec_b.steps) == [6, 7, 8, 9, 10]
    for step in (6, 10):
        a, b = rec_a.steps[step], rec_b.steps[step]
        for sa, sb in zip(a["scores"], b["scores"], strict=True):
            torch.testing.assert_close(sb, sa, rtol=1e-5, atol=1e-6)
        for name in a["masks"]:
            assert torch.equal(a["masks"][name], b["masks"][name])
            torch.testing.assert_close(b["weights"][name], a["weights"][name], rtol=1e-5, atol=1e-6)
        assert b["score_lr"] == pytest.approx(a["score_lr"])
    assert pruner_b.current_target == pytest.approx(pruner_a.current_target)


def test_export_is_a_plain_bert_without_scores(tmp_path):
    model = _no_dropout_bert()
    pruner = _hard(model, final_sparsity=0.7, end_step=4)
    make_trainer(tmp_path / "run", model, [pruner], max_steps=5).train()
    batch = {"input_ids": torch.tensor([[2, 7, 8, 9, 3]]), "attention_mask": torch.ones(1, 5, dtype=torch.long)}
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
    report = export_pruned_model(model, tmp_path / "export", tiny_tokenizer(), method="movement")
    assert report["global_sparsity"] == pytest.approx(0.7, abs=1e-3)
    keys = load_file(tmp_path / "export" / "model.safetensors")
    assert not any("mask" in k for k in keys)
    reloaded = AutoModelForTokenClassification.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=1e-5, atol=1e-6)


def test_export_before_the_end_drops_scores_too(tmp_path):
    model = _no_dropout_bert()
    pruner = _hard(model)
    with torch.no_grad():
        for p in pruner.score_params():
            p.copy_(torch.randn_like(p))
    pruner.schedule = pruner.config.schedule.resolve(10)
    pruner.prune(10)
    export_pruned_model(model, tmp_path / "export", method="movement")
    keys = load_file(tmp_path / "export" / "model.safetensors")
    assert not any("mask" in k for k in keys)
    pruned = [k for k in keys if "encoder" in k and k.endswith(".weight") and "LayerNorm" not in k]
    zeros = sum(int((keys[k] == 0).sum()) for k in pruned)
    assert zeros == sum(round(0.8 * keys[k].numel()) for k in pruned)  # layer scope: 80% of every layer


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="variant"):
        MovementPruningCallback(tiny_bert(), variant="medium")
    with pytest.raises(ValueError, match="final_threshold"):
        MovementPruningCallback(tiny_bert(), variant="soft", final_threshold=1.5)
    with pytest.raises(ValueError, match="movement options: unknown key 'score_lr_typo'"):
        MovementPruningCallback(tiny_bert(), PruningConfig(method="movement", options={"score_lr_typo": 1}))
