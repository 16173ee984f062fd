"""`DistillationCallback`: the loss it builds, eval untouched, use with a pruning callback and in recipes."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import yaml
from helpers import make_trainer, tiny_bert, tiny_tokenizer
from transformers import TrainerCallback

from prune_trainer.callbacks.distillation import DistillationCallback, distillation_loss, make_distillation_callback
from prune_trainer.callbacks.movement import MovementPruningCallback
from prune_trainer.recipes.runner import load_recipe, run_recipe


def _student_teacher():
    kw = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return tiny_bert(seed=0, **kw), tiny_bert(seed=1, **kw)


BATCH = {
    "input_ids": torch.tensor([[2, 7, 8, 9, 3, 0], [2, 10, 11, 3, 0, 0]]),
    "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]),
    "labels": torch.tensor([[-100, 1, 0, 3, -100, -100], [-100, 5, 6, -100, -100, -100]]),
}


def _begin(cb):
    cb.on_train_begin(SimpleNamespace(device=torch.device("cpu")), None, None)


def _manual_kd(student_logits, teacher_logits, labels, t):
    sel = labels != -100
    s = F.log_softmax(student_logits[sel] / t, -1)
    p = F.softmax(teacher_logits[sel] / t, -1)
    return F.kl_div(s, p, reduction="batchmean") * t * t  # batchmean over the labelled tokens


def test_loss_is_the_alpha_mix_of_task_loss_and_t2_kl():
    student, teacher = _student_teacher()
    with torch.no_grad():
        ce = student(**BATCH).loss
        s_logits = student(**BATCH).logits
        t_logits = teacher(**{k: v for k, v in BATCH.items() if k != "labels"}).logits
    expected = 0.3 * ce + 0.7 * _manual_kd(s_logits, t_logits, BATCH["labels"], 2.5)
    cb = DistillationCallback(student, teacher, alpha=0.7, temperature=2.5)
    _begin(cb)
    student.train()
    out = student(**BATCH)
    torch.testing.assert_close(out.loss, expected)
    assert cb.last_kd_loss == pytest.approx(float(_manual_kd(s_logits, t_logits, BATCH["labels"], 2.5)), rel=1e-4)
    out.loss.backward()  # gradients flow to the student only
    assert all(p.grad is None for p in teacher.parameters())
    assert any(p.grad is not None for p in student.parameters())


def test_eval_mode_and_identical_teacher():
    student, _ = _student_teacher()
    twin = tiny_bert(seed=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cb = DistillationCallback(student, twin, alpha=0.5, temperature=2.0)
    _begin(cb)
    student.eval()
    with torch.no_grad():
        ce = student(**BATCH).loss  # eval: untouched
    student.train()
    torch.testing.assert_close(student(**BATCH).loss, 0.5 * ce, atol=1e-6, rtol=1e-6)  # KL(p‖p) = 0
    cb.on_train_end(None, None, None)
    torch.testing.assert_close(student(**BATCH).loss, ce)  # hook removed


def test_distillation_loss_helper_and_bad_arguments():
    s, t = torch.randn(4, 9), torch.randn(4, 9)
    expected = F.kl_div(F.log_softmax(s / 3, -1), F.softmax(t / 3, -1), reduction="batchmean") * 9
    torch.testing.assert_close(distillation_loss(s, t, 3.0), expected)
    student, teacher = _student_teacher()
    with pytest.raises(ValueError, match="alpha"):
        DistillationCallback(student, teacher, alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        DistillationCallback(student, teacher, temperature=0)
    with pytest.raises(ValueError, match="separate"):
        DistillationCallback(student, student)
    with pytest.raises(ValueError, match="unknown distillation"):
        make_distillation_callback(student, {"teacher": "x", "beta": 1})
    with pytest.raises(ValueError, match="init_from"):
        make_distillation_callback(student, {"teacher": "init_from"}, None)


def test_soft_movement_penalty_is_not_scaled_by_one_minus_alpha():
    student, teacher = _student_teacher()
    pruner = MovementPruningCallback(student, variant="soft", final_lambda=1.0)
    pruner._hooks.append(student.register_forward_hook(pruner._loss_hook))  # registered BEFORE the KD hook
    pruner.current_lambda = 4.0
    cb = DistillationCallback(student, teacher, alpha=0.6, temperature=2.0)
    _begin(cb)
    student.eval()
    with torch.no_grad():
        ce = student(**BATCH).loss
        s_logits = student(**BATCH).logits
        t_logits = teacher(**{k: v for k, v in BATCH.items() if k != "labels"}).logits
    r = torch.stack([torch.sigmoid(p).mean() for p in pruner.score_params()]).mean()
    expected = 0.4 * ce + 0.6 * _manual_kd(s_logits, t_logits, BATCH["labels"], 2.0) + 4.0 * r
    student.train()
    torch.testing.assert_close(student(**BATCH).loss, expected)


def test_distillation_with_pruning_in_a_trainer(tmp_path):
    student, teacher = _student_teacher()
    pruner = MovementPruningCallback(student, variant="hard", final_sparsity=0.5, end_step=4, frequency=1)
    cb = DistillationCallback(student, teacher, alpha=0.5, temperature=2.0)
    kd_seen = []

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            kd_seen.append(cb.last_kd_loss)

    make_trainer(tmp_path, student, [pruner, cb, Spy()], max_steps=4).train()
    assert len(kd_seen) == 4 and all(v is not None and v > 0 for v in kd_seen)
    assert pruner.sparsity()[0] == pytest.approx(0.5, abs=1e-3)


def test_recipe_with_movement_and_distillation_end_to_end(tmp_path, conll_dir):
    model_dir = tmp_path / "dense"
    tiny_bert().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    recipe_path = tmp_path / "movement_hard_tiny.yaml"
    recipe_path.write_text(yaml.safe_dump({
        "model": str(model_dir),
        "init_from": str(model_dir),
        "data": {"data_dir": str(conll_dir), "max_length": 32},
        "training": {"max_steps": 4, "per_device_train_batch_size": 8, "eval_strategy": "no", "save_strategy": "no",
                     "use_cpu": True, "disable_tqdm": True, "logging_steps": 2},
        "pruning": {"method": "movement",
                    "schedule": {"kind": "cubic", "final_sparsity": 0.5, "end_step": 0.5, "frequency": 1},
                    "options": {"variant": "hard"}},
        "distillation": {"teacher": "init_from", "alpha": 0.5, "temperature": 2.0},
    }))
    recipe = load_recipe(recipe_path)
    metrics = run_recipe(recipe, results_root=tmp_path / "results")
    out = tmp_path / "results" / "movement_hard_tiny"
    assert (out / "metrics.json").is_file() and "eval_f1" in metrics
    assert metrics["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert metrics["config"]["distillation"]["teacher"] == "init_from"
    from safetensors.torch import load_file

    assert not any("mask" in k for k in load_file(out / "model" / "model.safetensors"))


def _train_with_distillation(tmp_path, student, teacher, rows: list[dict]) -> list[float]:
    """A few Trainer steps with KD; the KD term after each step."""
    from transformers import Trainer, TrainingArguments, default_data_collator

    cb = DistillationCallback(student, teacher, alpha=0.5, temperature=2.0)
    kd_seen = []

    class Spy(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            kd_seen.append(cb.last_kd_loss)

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-3, report_to="none",
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    Trainer(model=student, args=args, train_dataset=rows, data_collator=default_data_collator,
            callbacks=[cb, Spy()]).train()
    return kd_seen


def test_question_answering_distils_start_and_end_logits(tmp_path):
    from helpers import tiny_bert_config
    from transformers import BertForQuestionAnswering

    cfg = tiny_bert_config(num_labels=2, id2label={0: "start", 1: "end"}, label2id={"start": 0, "end": 1},
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    student, teacher = BertForQuestionAnswering(cfg), BertForQuestionAnswering(cfg)
    g = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": torch.randint(5, cfg.vocab_size, (12,), generator=g), "attention_mask": torch.ones(12, dtype=int),
         "start_positions": torch.tensor(i % 6), "end_positions": torch.tensor(i % 6 + 3)}
        for i in range(16)
    ]
    kd_seen = _train_with_distillation(tmp_path, student, teacher, rows)
    assert len(kd_seen) == 3 and all(v is not None and 0 < v < float("inf") for v in kd_seen)
    # the KD term is the mean of the start and end terms
    batch = {k: torch.stack([r[k] for r in rows[:4]]) for k in rows[0]}
    cb = DistillationCallback(student, teacher, alpha=1.0, temperature=2.0)
    _begin(cb)
    student.train()
    loss = student(**batch).loss
    student.eval()
    with torch.no_grad():
        s, t = student(input_ids=batch["input_ids"]), teacher(input_ids=batch["input_ids"])
    expected = sum(distillation_loss(s[k], t[k], 2.0) for k in ("start_logits", "end_logits")) / 2
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


def test_encoder_decoder_teacher_gets_decoder_inputs_from_the_labels(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=32, d_model=16, d_ff=32, d_kv=8, num_layers=1, num_heads=2, dropout_rate=0.0,
                   decoder_start_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    student, teacher = T5ForConditionalGeneration(cfg), T5ForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(16):
        labels = torch.randint(1, 32, (6,), generator=g)
        labels[4:] = -100  # padded target positions are left out of the KL
        rows.append({"input_ids": torch.randint(1, 32, (8,), generator=g), "attention_mask": torch.ones(8, dtype=int),
                     "labels": labels})
    kd_seen = _train_with_distillation(tmp_path, student, teacher, rows)
    assert len(kd_seen) == 3 and all(v is not None and 0 < v < float("inf") for v in kd_seen)


def test_output_without_logits_is_an_error_naming_its_keys():
    class NoLogits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 3)

        def forward(self, x):
            return {"loss": self.lin(x).sum(), "scores": self.lin(x)}

    student, teacher = NoLogits(), NoLogits()
    cb = DistillationCallback(student, teacher)
    _begin(cb)
    with pytest.raises(ValueError, match=r"'loss', 'scores'"):
        student(x=torch.ones(2, 3))
