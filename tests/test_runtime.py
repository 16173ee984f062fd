"""ONNX export and ONNX Runtime inference (the ``deploy`` extra): outputs equal PyTorch's, F1 through the runtime."""

import pytest
import torch
from helpers import tiny_bert, tiny_tokenizer, write_conll_dir, zero_ffn_neurons
from test_compressed import pruned_bert

from prune_trainer import export_pruned_model, load_conll_splits, load_pruned_model
from prune_trainer.export.runtime import (
    OrtTokenClassifier,
    export_onnx,
    quantize_onnx_int8,
    quantize_torch_dynamic,
)
from prune_trainer.oneshot.evaluation import evaluate_f1

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _batch(vocab: int, batch: int = 3, seq: int = 11) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0  # padding in one row
    return {"input_ids": ids, "attention_mask": mask}


def test_onnx_outputs_equal_pytorch_and_int8_stays_close(tmp_path):
    model = pruned_bert()
    export_pruned_model(model, tmp_path / "c", format="bitmask", quantize="int8")
    loaded = load_pruned_model(tmp_path / "c")
    export_onnx(loaded, tmp_path / "m.onnx")
    assert not loaded.training  # the exporter leaves the model's mode as it was
    batch = _batch(loaded.config.vocab_size)  # other batch and sequence sizes than the traced ones
    with torch.no_grad():
        ref = loaded(**batch).logits
    session = OrtTokenClassifier(tmp_path / "m.onnx", threads=1)
    torch.testing.assert_close(session(**batch, token_type_ids=torch.zeros_like(batch["input_ids"])).logits, ref,
                               atol=1e-4, rtol=1e-4)
    quantize_onnx_int8(tmp_path / "m.onnx", tmp_path / "m.int8.onnx")
    assert (tmp_path / "m.int8.onnx").stat().st_size < (tmp_path / "m.onnx").stat().st_size
    int8 = OrtTokenClassifier(tmp_path / "m.int8.onnx", threads=1)(**batch).logits
    assert (int8 - ref).abs().max() < 0.1 * ref.abs().max()  # dynamic INT8 activations: close, not equal
    with torch.no_grad():
        torch_int8 = quantize_torch_dynamic(loaded)(**batch).logits
    assert (torch_int8 - ref).abs().max() < 0.1 * ref.abs().max()
    with pytest.raises(ValueError, match="needs inputs"):
        session(input_ids=batch["input_ids"])


def test_structured_model_exports_and_f1_through_the_runtime_matches(tmp_path):
    from prune_trainer import export_structured_model

    model = tiny_bert(num_attention_heads=4).eval()
    zero_ffn_neurons(model, 40)
    export_structured_model(model, tmp_path / "s")
    small = load_pruned_model(tmp_path / "s")
    export_onnx(small, tmp_path / "s.onnx")
    tok = tiny_tokenizer()
    sentences = load_conll_splits(write_conll_dir(tmp_path / "conll"))["validation"]
    ours = evaluate_f1(OrtTokenClassifier(tmp_path / "s.onnx", threads=1), tok, sentences, batch_size=8)
    ref = evaluate_f1(small, tok, sentences, batch_size=8)
    assert ours["accuracy"] == pytest.approx(ref["accuracy"]) and ours["f1"] == pytest.approx(ref["f1"])


def test_onnx_command_writes_int8_and_evaluates(tmp_path, capsys):
    import json

    from prune_trainer.cli import main

    export_pruned_model(pruned_bert(), tmp_path / "m", tiny_tokenizer())
    data = write_conll_dir(tmp_path / "conll")
    assert main(["onnx", str(tmp_path / "m"), str(tmp_path / "m.int8.onnx"), "--quantize", "int8", "--eval",
                 "--data-dir", str(data), "--threads", "1"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["quantize"] == "int8" and 0.0 <= summary["eval_f1"] <= 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conll", "m", "m.int8.onnx"]  # no fp32 file left
