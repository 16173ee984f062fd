"""Hidden-state distillation (CoFi's layerwise term): the loss against a hand computation, β = 0 unchanged, layer
matching, errors, recipe validation and a Trainer run."""

from __future__ import annotations

import pytest
import torch
from helpers import make_trainer, tiny_bert
from test_distillation import BATCH, _begin, _student_teacher
from transformers import TrainerCallback

from prune_trainer.callbacks.distillation import DistillationCallback, distillation_loss, hidden_distillation_loss
from prune_trainer.recipes.recipe import Recipe


def _hand_mse(s: torch.Tensor, t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MSE over the features of the unmasked positions, one position at a time."""
    positions = mask.nonzero().tolist()
    terms = [((s[n, j] - t[n, j]) ** 2).mean() for n, j in positions]
    return torch.stack(terms).mean()


@pytest.mark.parametrize("layers", ["all", [1]])
def test_loss_adds_beta_times_the_mean_layer_mse(layers):
    student, teacher = _student_teacher()
    inputs = {k: v for k, v in BATCH.items() if k != "labels"}
    with torch.no_grad():
        s_out = student(**BATCH, output_hidden_states=True)
        t_out = teacher(**inputs, output_hidden_states=True)
    kd = distillation_loss(s_out.logits, t_out.logits, 2.0, BATCH["labels"] != -100)
    chosen = [0, 1] if layers == "all" else layers
    hidden = torch.stack([
        _hand_mse(s_out.hidden_states[i + 1], t_out.hidden_states[i + 1], BATCH["attention_mask"]) for i in chosen
    ]).mean()
    cb = DistillationCallback(student, teacher, alpha=0.7, temperature=2.0, hidden_weight=0.5, hidden_layers=layers)
    _begin(cb)
    student.train()
    out = student(**BATCH)
    torch.testing.assert_close(out.loss, 0.3 * s_out.loss + 0.7 * kd + 0.5 * hidden)
    assert cb.last_hidden_loss == pytest.approx(float(hidden), rel=1e-5)
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())


def test_beta_zero_leaves_the_loss_bit_identical_and_asks_for_no_hidden_states():
    student, teacher = _student_teacher()
    seen = []
    teacher.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("output_hidden_states")), with_kwargs=True)
    cb = DistillationCallback(student, teacher, alpha=0.7, temperature=2.0, hidden_weight=0.0, hidden_layers=[0])
    _begin(cb)
    student.train()
    out = student(**BATCH)
    student.eval()  # no dropout: the same function, and the hook is off
    with torch.no_grad():
        ce, s_logits = student(**BATCH).to_tuple()[:2]
    t_logits = teacher(**{k: v for k, v in BATCH.items() if k != "labels"}).logits
    kd = torch.stack([distillation_loss(s_logits, t_logits, 2.0, BATCH["labels"] != -100)]).mean()
    assert torch.equal(out.loss.detach(), (1.0 - 0.7) * ce + 0.7 * kd.to(ce.dtype))  # today's formula, bit for bit
    assert out.hidden_states is None and seen[0] is None and cb.last_hidden_loss is None


def test_cofi_matching_pairs_each_teacher_layer_with_its_closest_student_layer():
    g = torch.Generator().manual_seed(0)
    a, b, c = (torch.randn(2, 3, 4, generator=g) for _ in range(3))
    student = [torch.zeros(2, 3, 4), a.clone().requires_grad_(), b.clone().requires_grad_(), c.clone().requires_grad_()]
    teacher = [torch.zeros(2, 3, 4), b + 0.01, a + 0.02]  # teacher layer 0 ~ student layer 1, teacher 1 ~ student 0
    loss = hidden_distillation_loss(student, teacher, "all", match_layers=True)
    expected = (((b - teacher[1]) ** 2).mean() + ((a - teacher[2]) ** 2).mean()) / 2
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert student[3].grad is None or not student[3].grad.any()  # the unmatched student layer gets no gradient
    mask = torch.tensor([[True, True, False], [True, False, False]])
    masked = hidden_distillation_loss(student, teacher, [1], match_layers=True, select=mask)
    torch.testing.assert_close(masked, _hand_mse(a, teacher[2], mask))
    with pytest.raises(ValueError, match="needs match_layers: true"):
        hidden_distillation_loss(student, teacher, "all")
    with pytest.raises(ValueError, match="equal hidden sizes, got student 4 and teacher 5"):
        hidden_distillation_loss(student, [torch.zeros(2, 3, 5)] * 4, "all")
    with pytest.raises(ValueError, match="hidden_layers \\[7\\]: the teacher has layers 0..1"):
        hidden_distillation_loss(student, teacher, [7], match_layers=True)


def test_a_one_layer_student_matches_a_two_layer_teacher_in_the_callback():
    student = tiny_bert(seed=0, num_hidden_layers=1, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    _, teacher = _student_teacher()
    cb = DistillationCallback(student, teacher, alpha=0.0, hidden_weight=1.0, match_layers=True)
    _begin(cb)
    with torch.no_grad():  # eval (hook off), no dropout: the same function as in training
        ce, _, s_hidden = student.eval()(**BATCH, output_hidden_states=True).to_tuple()[:3]
        t_hidden = teacher(input_ids=BATCH["input_ids"], attention_mask=BATCH["attention_mask"],
                           output_hidden_states=True).hidden_states
    student.train()
    expected = ce + torch.stack([_hand_mse(s_hidden[1], t, BATCH["attention_mask"]) for t in t_hidden[1:]]).mean()
    torch.testing.assert_close(student(**BATCH).loss, expected)
    unmatched = DistillationCallback(student, teacher, alpha=0.5, hidden_weight=1.0)
    cb.on_train_end(None, None, None)
    _begin(unmatched)
    with pytest.raises(ValueError, match="student has 1 layers and the teacher 2"):
        student(**BATCH)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"hidden_weight": -1.0}, "distillation.hidden_weight must be a finite number >= 0, got -1.0"),
        ({"hidden_weight": "big"}, "distillation.hidden_weight"),
        ({"hidden_weight": float("nan")}, "distillation.hidden_weight"),
        ({"hidden_layers": []}, "distillation.hidden_layers must be 'all' or a non-empty list"),
        ({"hidden_layers": [0, 0]}, "distillation.hidden_layers"),
        ({"hidden_layers": [-1]}, "distillation.hidden_layers"),
        ({"hidden_layers": [True]}, "distillation.hidden_layers"),
        ({"hidden_layers": "some"}, "distillation.hidden_layers"),
        ({"match_layers": "yes"}, "distillation.match_layers must be true or false"),
        ({"alpha": 2}, "distillation.alpha must be in \\[0, 1\\]"),
        ({"teacher": 3}, "distillation.teacher"),
        ({"hidden_weigth": 1.0}, "unknown distillation key"),
    ],
)
def test_recipe_validation_names_the_bad_distillation_key(cfg, message):
    with pytest.raises(ValueError, match=f"^r\\.yaml: .*{message}"):
        Recipe.from_dict({"name": "x", "distillation": {"teacher": "init_from", **cfg}}, source="r.yaml")
    ok = Recipe.from_dict({"name": "x", "distillation": {"hidden_weight": 0.5, "hidden_layers": [0, 3],
                                                         "match_layers": True}})
    assert ok.distillation["hidden_layers"] == [0, 3]


def test_trainer_run_logs_the_hidden_term_and_eval_is_untouched(tmp_path):
    student, teacher = _student_teacher()
    cb = DistillationCallback(student, teacher, alpha=0.5, hidden_weight=2.0, hidden_layers=[1])
    seen, logged = [], []

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(cb.last_hidden_loss)

        def on_log(self, args, state, control, logs=None, **kwargs):
            logged.append(dict(logs))

    trainer = make_trainer(tmp_path, student, [cb, Spy()], max_steps=3, logging_steps=1)
    trainer.train()
    assert len(seen) == 3 and all(v is not None and 0 < v < float("inf") for v in seen)
    assert any(log.get("distill/hidden_loss", 0) > 0 for log in logged)
    student.eval()
    with torch.no_grad():
        assert student(**BATCH).hidden_states is None  # outside training the student is not asked for them
