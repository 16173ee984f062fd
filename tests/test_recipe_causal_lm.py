"""Causal-LM recipes (``task: causal-lm``): training-time pruning of a tiny Llama / GPT-2 on plain text, the final
perplexity against `perplexity` of the reloaded export, resume, fine-tuning with the start's zeros fixed
(``fixed_mask`` with ``masks: zeros``), and the errors raised before anything is written."""

import json
import shutil

import pytest
import torch
import yaml
from family_models import tiny_family_model
from helpers import make_trainer, tiny_bert, tiny_tokenizer
from test_llm_text import tiny_llama
from transformers import AutoModelForCausalLM

from prune_trainer.callbacks.fixed_mask import FixedMaskCallback
from prune_trainer.cli import main
from prune_trainer.data.text import load_text, tokenize_text
from prune_trainer.llm.perplexity import perplexity
from prune_trainer.recipes.lm_data import eval_windows, train_blocks


def _save(model, path):
    model.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _recipe(tmp_path, model_dir, conll_dir, pruning, **training):
    recipe = {
        "name": "lm", "task": "causal-lm", "model": str(model_dir),
        "data": {"data_dir": str(conll_dir), "max_length": 16, "max_eval_samples": 3},
        "training": {"max_steps": 6, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 2,
                     "learning_rate": 1e-2, "logging_steps": 2, "eval_strategy": "steps", "eval_steps": 3,
                     "save_steps": 3, "save_total_limit": 2, "use_cpu": True, "disable_tqdm": True, **training},
        "pruning": pruning,
    }
    path = tmp_path / "lm.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _run(path, tmp_path, *extra):
    return main(["run", str(path), "--results-dir", str(tmp_path / "results"), *extra])


def _decoder_weights(model):
    """The weights of the Linears (GPT-2: Conv1D) inside the decoder blocks, by name."""
    inside = (".layers.", ".h.")  # Llama's model.layers, GPT-2's transformer.h
    return {n: p.detach() for n, p in model.named_parameters()
            if n.endswith(".weight") and p.dim() == 2 and any(part in n for part in inside)}


MAGNITUDE = {"method": "magnitude", "scope": "global",
             "schedule": {"kind": "cubic", "final_sparsity": 0.5, "end_step": 4, "frequency": 1}}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_magnitude_run_writes_perplexity_of_the_export_and_reaches_its_sparsity(tmp_path, conll_dir, capsys, family):
    model = tiny_llama(3) if family == "llama" else tiny_family_model("gpt2")
    path = _recipe(tmp_path, _save(model, tmp_path / "start"), conll_dir, MAGNITUDE)
    assert _run(path, tmp_path) == 0
    assert "eval_perplexity=" in capsys.readouterr().out
    out = tmp_path / "results" / "lm"
    metrics = json.loads((out / "metrics.json").read_text())
    exported = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    ids = tokenize_text(load_text("conll-validation", conll_dir), tiny_tokenizer())
    expected = perplexity(exported, ids, 16, max_windows=3)
    assert metrics["eval_perplexity"] == pytest.approx(expected.perplexity, rel=1e-5)
    assert metrics["eval_nll"] == pytest.approx(expected.nll, rel=1e-5)
    assert (metrics["eval_tokens"], metrics["eval_windows"]) == (3 * 15, 3)
    weights = _decoder_weights(exported)
    zeros = sum(int((w == 0).sum()) for w in weights.values()) / sum(w.numel() for w in weights.values())
    assert metrics["sparsity"] == pytest.approx(0.5, abs=1e-3) and zeros == pytest.approx(0.5, abs=1e-3)
    assert metrics["train_steps"] == 6 and "eval_f1" not in metrics
    assert any("eval_loss" in row for row in metrics["log_history"])  # the Trainer evaluated the windows
    assert exported.config.use_cache is True  # off while training only
    assert "eval_perplexity" in (out / "README.md").read_text()
    for key in ("wall_time_s", "git_commit", "device", "config", "command"):
        assert key in metrics


def test_interrupted_run_resumes_from_its_checkpoint_to_the_same_result(tmp_path, conll_dir):
    path = _recipe(tmp_path, _save(tiny_llama(4), tmp_path / "start"), conll_dir, MAGNITUDE)
    assert _run(path, tmp_path) == 0
    out = tmp_path / "results" / "lm"
    first = json.loads((out / "metrics.json").read_text())
    for name in ("metrics.json", "model", "checkpoints/checkpoint-6"):  # as if killed after step 5
        target = out / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    assert _run(path, tmp_path) == 0
    second = json.loads((out / "metrics.json").read_text())
    assert second["resumed_from_step"] == 3 and second["train_steps"] == 6
    assert second["eval_perplexity"] == pytest.approx(first["eval_perplexity"], rel=1e-4)
    assert second["sparsity"] == pytest.approx(first["sparsity"])


def _with_zeros(model, fraction=0.5, seed=0):
    """Zero a random ``fraction`` of every decoder Linear weight (a one-shot export's pattern)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for w in _decoder_weights(model).values():
            w.mul_(torch.rand(w.shape, generator=gen) >= fraction)
    return model


def test_fixed_mask_zeros_recipe_keeps_the_start_zeros_exactly(tmp_path, conll_dir):
    start = _with_zeros(tiny_llama(5))
    before = {n: w.clone() for n, w in _decoder_weights(start).items()}
    fixed = {"method": "fixed_mask", "options": {"masks": "zeros"}}
    path = _recipe(tmp_path, _save(start, tmp_path / "start"), conll_dir, fixed, eval_strategy="no")
    assert _run(path, tmp_path) == 0
    out = tmp_path / "results" / "lm"
    metrics = json.loads((out / "metrics.json").read_text())
    after = _decoder_weights(AutoModelForCausalLM.from_pretrained(out / "model"))
    for name, w in before.items():
        assert torch.equal(after[name] == 0, w == 0), name  # same zeros, no new ones
    assert any(not torch.equal(after[n], w) for n, w in before.items())  # the kept weights trained
    start_sparsity = sum(int((w == 0).sum()) for w in before.values()) / sum(w.numel() for w in before.values())
    assert metrics["sparsity"] == pytest.approx(start_sparsity, abs=1e-6)


def test_fixed_mask_zeros_on_a_bert_trainer_run(tmp_path):
    model = tiny_bert()
    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.intermediate.dense.weight[:, ::2] = 0.0
    pruner = FixedMaskCallback(model, masks="zeros")
    zeros = {n: (layer.weight == 0).clone() for n, layer in pruner.layers.items()}
    make_trainer(tmp_path, model, [pruner], max_steps=4).train()
    for name, layer in pruner.layers.items():
        assert torch.equal(layer.weight == 0, zeros[name]), name
    assert pruner.sparsity()[0] == pytest.approx(sum(int(z.sum()) for z in zeros.values())
                                                 / sum(z.numel() for z in zeros.values()))


def test_blocks_and_windows():
    ids = torch.arange(37)
    assert torch.equal(train_blocks(ids, 8), ids[:32].view(4, 8))
    assert torch.equal(train_blocks(ids, 8, max_blocks=2), ids[:16].view(2, 8))
    assert torch.equal(eval_windows(ids, 8, max_windows=2), torch.stack([ids[0:8], ids[16:24]]))  # as perplexity
    with pytest.raises(ValueError, match="fewer than one block of max_length=64"):
        train_blocks(ids, 64)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"task": "summarization"}, "task must be one of ['token-classification', 'causal-lm'], got 'summarization'"),
        ({"data.train_text": "/nonexistent/train.txt"}, "data.train_text '/nonexistent/train.txt' is neither a file"),
        ({"data.eval_text": "missing.txt"}, "data.eval_text 'missing.txt' is neither a file"),
        ({"data.max_length": 100}, "data.max_length=100 is above the model's context of 64 tokens"),
        ({"factorize_embeddings": 4}, "factorize_embeddings can only be used with task token-classification"),
        ({"model": "/nonexistent/llm.gguf"}, "GGUF model file '/nonexistent/llm.gguf' does not exist"),
    ],
)
def test_bad_input_errors_before_the_output_folder_exists(tmp_path, conll_dir, capsys, change, message):
    path = _recipe(tmp_path, _save(tiny_llama(), tmp_path / "start"), conll_dir, MAGNITUDE)
    argv = [arg for key, value in change.items() for arg in ("--set", f"{key}={value}")]
    assert _run(path, tmp_path, *argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_lottery_refuses_a_causal_lm_recipe_before_writing(tmp_path, conll_dir, capsys):
    path = _recipe(tmp_path, _save(tiny_llama(), tmp_path / "start"), conll_dir, None)
    rc = main(["lottery", str(path), "--results-dir", str(tmp_path / "results")])
    assert rc == 2 and "the lottery runs token-classification recipes only" in capsys.readouterr().err
    assert not (tmp_path / "results").exists()


def test_token_classification_recipes_keep_their_recorded_identity():
    """The new keys stay out of a tagging recipe's `to_dict` at their defaults, so ``run_config.json`` of runs
    recorded before them still matches on a resume; a causal-LM recipe records them."""
    import os

    from prune_trainer.recipes.runner import load_recipe

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    tagger = load_recipe(os.path.join(root, "recipes", "magnitude_90.yaml")).to_dict()
    assert "task" not in tagger
    assert set(tagger["data"]) == {"data_dir", "hub_dataset", "max_length", "max_train_samples", "max_eval_samples"}
    lm = load_recipe(os.path.join(root, "recipes", "llm_magnitude_50.yaml")).to_dict()
    assert lm["task"] == "causal-lm" and lm["data"]["train_text"] == "conll-train"
