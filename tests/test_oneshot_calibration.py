"""Sequential calibration runner, the one-shot job and its CLI on a tiny random BERT."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import AutoModelForTokenClassification

from prune_trainer.cli import main
from prune_trainer.data.conll import load_conll_splits
from prune_trainer.devices import resolve_device
from prune_trainer.oneshot.base import LayerStats
from prune_trainer.oneshot.calibration import (
    block_stacks,
    calibration_batches,
    prune_sequential,
    wanda_outlier_ratios,
)
from prune_trainer.oneshot.magnitude import magnitude_prune
from prune_trainer.oneshot.registry import OneShotMethod, get_method
from prune_trainer.oneshot.runner import OneShotConfig, run_oneshot

Q0 = "bert.encoder.layer.0.attention.self.query"
Q1 = "bert.encoder.layer.1.attention.self.query"


def recording_method(model, seen: dict[str, LayerStats]) -> OneShotMethod:
    """Magnitude pruning that records the statistics it is given, by layer name."""
    names = {m.weight.data_ptr(): n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}

    def prune(weight, stats, sparsity, prunen=0, prunem=0):
        seen[names[weight.data_ptr()]] = stats
        return magnitude_prune(weight, stats, sparsity, prunen, prunem)

    return OneShotMethod("recording", prune, needs_hessian=True)


def _manual_stats(model, batches, layer_index):
    """X Xᵀ of a block's input over real tokens, from output_hidden_states (independent path)."""
    xs = []
    with torch.no_grad():
        for b in batches:
            hs = model(**b, output_hidden_states=True).hidden_states[layer_index]
            xs.append(hs[b["attention_mask"].bool()])
    x = torch.cat(xs).double()
    return x.T @ x, x.shape[0]


@pytest.fixture
def batches(conll_dir, tokenizer):
    return calibration_batches(load_conll_splits(conll_dir)["train"], tokenizer, 20, batch_size=8)


@pytest.mark.parametrize("pruned_inputs", [True, False])
def test_hook_statistics_match_hidden_states(model, batches, pruned_inputs):
    model.eval()
    dense_xxt1, n = _manual_stats(model, batches, 1)
    dense_xxt0, _ = _manual_stats(model, batches, 0)
    seen: dict[str, LayerStats] = {}
    method = recording_method(model, seen)
    report = prune_sequential(model, batches, method, 0.5, pruned_inputs=pruned_inputs, progress=False)
    assert report.n_tokens == n == seen[Q0].n_tokens  # padding excluded
    torch.testing.assert_close(seen[Q0].xxt, dense_xxt0, rtol=1e-4, atol=1e-3)
    # Block 1 sees the pruned block 0's outputs (pruned_inputs) or the dense ones.
    expected = _manual_stats(model, batches, 1)[0] if pruned_inputs else dense_xxt1
    other = dense_xxt1 if pruned_inputs else _manual_stats(model, batches, 1)[0]
    torch.testing.assert_close(seen[Q1].xxt, expected, rtol=1e-4, atol=1e-3)
    assert not torch.allclose(seen[Q1].xxt, other, rtol=1e-3, atol=1e-2)


@pytest.mark.parametrize("name", ["magnitude", "wanda", "sparsegpt", "obs"])
def test_prune_sequential_reaches_sparsity_on_all_encoder_linears(model, batches, name):
    report = prune_sequential(model, batches, get_method(name), 0.6, progress=False)
    assert len(report.layer_sparsity) == 12  # 2 blocks × (q, k, v, o, intermediate, output)
    for layer, s in report.layer_sparsity.items():
        w = model.get_submodule(layer).weight
        assert s == pytest.approx(0.6, abs=0.02)
        assert float((w == 0).float().mean()) == pytest.approx(s, abs=1e-6)
    assert (model.classifier.weight != 0).all()


def test_owl_per_layer_dict_and_outlier_ratios(model, batches):
    ratios = wanda_outlier_ratios(model, batches, m=1.0)
    assert len(ratios) == 12 and all(0 < d < 1 for d in ratios.values())
    alloc = {k: 0.3 + 0.4 * (i % 2) for i, k in enumerate(sorted(ratios))}
    report = prune_sequential(model, batches, get_method("wanda"), alloc, progress=False)
    for k, s in alloc.items():
        assert report.layer_sparsity[k] == pytest.approx(s, abs=0.02)
    with pytest.raises(ValueError, match="misses target layers"):
        prune_sequential(model, batches, get_method("wanda"), {Q0: 0.5}, progress=False)


def test_pipeline_creates_its_tensors_on_the_models_device(model, batches):
    """Meta as the default device: statistics, masks or indices made without ``device=`` would land on meta and
    fail against the CPU model (what a CUDA model would hit); the results equal a normal run's."""
    expected = prune_sequential(copy.deepcopy(model), batches, get_method("obs"), 0.5, progress=False)
    with torch.device("meta"):
        ratios = wanda_outlier_ratios(model, batches)
        report = prune_sequential(model, batches, get_method("obs"), 0.5, progress=False)
    assert len(ratios) == 12 and report.layer_sparsity == expected.layer_sparsity


def test_resolve_device():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="'gpu0' is not a torch device name"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda:1' asked for, but torch.cuda.is_available"):
            OneShotConfig(model="m", device="cuda:1").validate()


def test_empty_and_bad_calibration_data(model, tokenizer, conll_dir):
    sents = load_conll_splits(conll_dir)["train"]
    with pytest.raises(ValueError, match="empty calibration data"):
        calibration_batches([], tokenizer, 4)
    with pytest.raises(ValueError, match="positive integer, got 0"):
        calibration_batches(sents, tokenizer, 0)
    with pytest.raises(ValueError, match="only 64"):
        calibration_batches(sents, tokenizer, 65)
    with pytest.raises(ValueError, match="empty calibration data"):
        prune_sequential(model, [], get_method("sparsegpt"), 0.5, progress=False)


def test_block_stacks_found(model):
    (name, layers), = block_stacks(model)
    assert name == "bert.encoder.layer" and len(layers) == 2
    with pytest.raises(ValueError, match="no list of transformer blocks"):
        block_stacks(torch.nn.Sequential(torch.nn.Linear(2, 2)))


@pytest.fixture
def model_dir(tmp_path, model, tokenizer):
    path = tmp_path / "tiny_model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_run_oneshot_exports_and_writes_results(model_dir, conll_dir, tmp_path):
    out = tmp_path / "out"
    cfg = OneShotConfig(model=str(model_dir), method="sparsegpt", sparsity=0.7, owl=True, calib_samples=16,
                        data_dir=str(conll_dir), output_dir=str(out))
    res = run_oneshot(cfg, progress=False)
    saved = json.loads((out / "results.json").read_text())
    assert saved["eval_f1"] == res["eval_f1"] and 0 <= res["eval_f1"] <= 1
    assert res["prune_time_s"] > 0 and res["eval_sentences"] == 32
    assert res["sparsity"] == pytest.approx(0.7, abs=0.01)
    alloc = res["owl"]["layer_sparsity"]
    assert len(alloc) == 12 and len(set(alloc.values())) > 1  # non-uniform, weighted mean 0.7 (checked above)
    reloaded = AutoModelForTokenClassification.from_pretrained(out / "model")
    w = reloaded.bert.encoder.layer[0].output.dense.weight
    expected = res["sparsity_per_layer"]["bert.encoder.layer.0.output.dense"]
    assert float((w == 0).float().mean()) == pytest.approx(expected)


def test_oneshot_config_errors(model_dir):
    with pytest.raises(ValueError, match="unknown one-shot method 'foo'"):
        OneShotConfig(model=str(model_dir), method="foo").validate()
    with pytest.raises(ValueError, match="1.5"):
        OneShotConfig(model=str(model_dir), sparsity=1.5).validate()
    with pytest.raises(ValueError, match="cannot combine"):
        OneShotConfig(model=str(model_dir), owl=True, pattern="2:4").validate()


def test_cli_oneshot(model_dir, conll_dir, tmp_path, capsys):
    out = tmp_path / "cli_out"
    rc = main(["oneshot", "--model", str(model_dir), "--method", "wanda", "--pattern", "2:4", "--calib-samples", "8",
               "--data-dir", str(conll_dir), "--output-dir", str(out)])
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["sparsity"] == pytest.approx(0.5)
    assert (out / "model" / "sparsity.json").is_file()
    rc = main(["oneshot", "--model", str(model_dir), "--sparsity", "1.2", "--data-dir", str(conll_dir)])
    assert rc == 2


def test_evaluate_f1_matches_trainer_evaluate(model_dir, conll_dir, tmp_path):
    from transformers import DataCollatorForTokenClassification, Trainer, TrainingArguments

    from prune_trainer.data import make_compute_metrics, tokenize_and_align
    from prune_trainer.models import load_model_and_tokenizer
    from prune_trainer.oneshot.evaluation import evaluate_f1

    model, tok = load_model_and_tokenizer(str(model_dir))
    sents = load_conll_splits(conll_dir)["validation"]
    ours = evaluate_f1(model, tok, sents, batch_size=7)
    args = TrainingArguments(output_dir=str(tmp_path / "t"), per_device_eval_batch_size=5, report_to="none")
    trainer = Trainer(model=model, args=args, data_collator=DataCollatorForTokenClassification(tok),
                      compute_metrics=make_compute_metrics())
    ref = trainer.evaluate(tokenize_and_align(sents, tok))
    assert ours["f1"] == pytest.approx(ref["eval_f1"], abs=1e-9)
    assert ours["accuracy"] == pytest.approx(ref["eval_accuracy"], abs=1e-9)
