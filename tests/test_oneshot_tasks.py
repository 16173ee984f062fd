"""The task-agnostic one-shot job: each checkpoint keeps its own head; evaluation per task; GPT-2 and T5 run."""

from __future__ import annotations

import json

import pytest
import torch
from family_models import FAMILY_CONFIGS, tiny_family_model
from helpers import tiny_tokenizer
from transformers import AutoConfig, BertForSequenceClassification
from transformers.pytorch_utils import Conv1D

from prune_trainer.cli import main
from prune_trainer.oneshot.evaluation import TASK_EVALUATORS, evaluate_accuracy
from prune_trainer.oneshot.runner import OneShotConfig, run_oneshot
from prune_trainer.tasks import task_of


def _save(model, path):
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("family, task", [("gpt2", "causal-lm"), ("llama", "causal-lm"), ("t5", "seq2seq"),
                                          ("bert", "token-classification"),
                                          ("roberta", "sequence-classification")])
def test_task_from_architectures(family, task, tmp_path):
    path = _save(tiny_family_model(family), tmp_path / family)
    assert task_of(AutoConfig.from_pretrained(path)) == task


def test_explicit_task_must_match_the_head(tmp_path):
    path = _save(tiny_family_model("gpt2"), tmp_path / "gpt2")
    with pytest.raises(ValueError, match="has no token-classification head"):
        task_of(AutoConfig.from_pretrained(path), "token-classification", "gpt2")
    with pytest.raises(ValueError, match="unknown task 'lm'"):
        OneShotConfig(model=str(path), task="lm").validate()


def test_a_task_without_an_evaluator_is_an_error_before_work(tmp_path, conll_dir, monkeypatch):
    path = _save(tiny_family_model("gpt2"), tmp_path / "gpt2")
    monkeypatch.delitem(TASK_EVALUATORS, "causal-lm")
    cfg = OneShotConfig(model=str(path), method="sparsegpt", sparsity=0.5, calib_samples=16, data_dir=str(conll_dir),
                        output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="no evaluation is available for task 'causal-lm'"):
        run_oneshot(cfg, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["gpt2", "t5"])
def test_causal_and_seq2seq_checkpoints_are_pruned_with_their_own_head(family, tmp_path, conll_dir):
    path = _save(tiny_family_model(family), tmp_path / family)
    cfg = OneShotConfig(model=str(path), method="sparsegpt", sparsity=0.5, calib_samples=16, data_dir=str(conll_dir),
                        output_dir=str(tmp_path / "out"))
    task = "causal-lm" if family == "gpt2" else "seq2seq"
    res = run_oneshot(cfg.replace(evaluate=False), progress=False)
    assert res["task"] == task
    assert res["sparsity"] == pytest.approx(0.5, abs=0.01) and res["calib_tokens"] > 0
    reloaded = FAMILY_CONFIGS[family][2].from_pretrained(tmp_path / "out" / "model")
    if family == "gpt2":
        assert type(reloaded.transformer.h[0].attn.c_attn) is Conv1D
        assert float((reloaded.transformer.h[0].mlp.c_fc.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.02)
    else:  # both stacks pruned
        for stack in (reloaded.encoder, reloaded.decoder):
            w = stack.block[1].layer[-1].DenseReluDense.wo.weight
            assert float((w == 0).float().mean()) == pytest.approx(0.5, abs=0.02)


def test_sequence_classification_accuracy(tmp_path, conll_dir):
    torch.manual_seed(0)
    model = BertForSequenceClassification(AutoConfig.for_model(
        "bert", vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        num_labels=2, id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1}))
    path = _save(model, tmp_path / "cls")
    rows = [{"text": "the red korp went to ostra", "label": "pos"}, {"text": "alvo said", "label": 0},
            {"text": "a big umbra", "label": 1}]
    eval_file = tmp_path / "eval.jsonl"
    eval_file.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    cfg = OneShotConfig(model=str(path), method="wanda", sparsity=0.5, calib_samples=16, data_dir=str(conll_dir))
    with pytest.raises(ValueError, match="needs eval_file"):
        run_oneshot(cfg, progress=False)
    bad = tmp_path / "bad.jsonl"  # errors name file:line before the data is read or anything written
    for text, why in (('{"text": "a", "label": 0}\n{"text": "b", "label": ', "not valid JSON"),
                      ('{"text": "a", "label": "maybe"}', "not one of the model's labels")):
        bad.write_text(text)
        with pytest.raises(ValueError, match=f"{bad.name}:[12]: .*{why}"):
            run_oneshot(cfg.replace(eval_file=str(bad), data_dir=str(tmp_path / "none"),
                                    output_dir=str(tmp_path / "bad_out")), progress=False)
        assert not (tmp_path / "bad_out").exists()
    no_export = run_oneshot(cfg.replace(eval_file=str(eval_file), output_dir=str(tmp_path / "noexp"), export=False),
                            progress=False)
    written = json.loads((tmp_path / "noexp" / "results.json").read_text())
    assert written["sparsity"] == no_export["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert written["git_commit"] not in ("", None) and isinstance(written["command"], str)  # provenance
    assert not (tmp_path / "noexp" / "model").exists()
    res = run_oneshot(cfg.replace(eval_file=str(eval_file), output_dir=str(tmp_path / "out")), progress=False)
    assert res["task"] == "sequence-classification" and res["eval_examples"] == 3
    assert res["sparsity"] == pytest.approx(0.5, abs=0.01)
    # The job's accuracy is the share of arg-max predictions of the pruned model equal to the labels.
    pruned = BertForSequenceClassification.from_pretrained(tmp_path / "out" / "model").eval()
    tok = tiny_tokenizer()
    with torch.no_grad():
        enc = tok([r["text"] for r in rows], padding=True, return_tensors="pt")
        hand = float((pruned(**enc).logits.argmax(-1) == torch.tensor([1, 0, 1])).float().mean())
    assert res["eval_accuracy"] == pytest.approx(hand)
    assert evaluate_accuracy(pruned, tok, [r["text"] for r in rows], [1, 0, 1], batch_size=2)["accuracy"] == \
        pytest.approx(hand)


def test_cli_oneshot_causal_lm_without_eval(tmp_path, conll_dir, capsys):
    path = _save(tiny_family_model("llama"), tmp_path / "llama")
    out = tmp_path / "cli"
    rc = main(["oneshot", "--model", str(path), "--task", "causal-lm", "--method", "wanda", "--pattern", "2:4",
               "--calib-samples", "8", "--no-eval", "--data-dir", str(conll_dir), "--output-dir", str(out)])
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["task"] == "causal-lm" and line["sparsity"] == pytest.approx(0.5)
    rc = main(["oneshot", "--model", str(path), "--targets", r"mlp\.down_proj", "--method", "magnitude",
               "--no-eval", "--calib-samples", "8", "--data-dir", str(conll_dir), "--output-dir", str(tmp_path / "d")])
    assert rc == 0
    report = json.loads((tmp_path / "d" / "model" / "sparsity.json").read_text())
    assert sorted(report["per_layer"]) == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
