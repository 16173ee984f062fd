import json

import torch
from helpers import make_trainer, tiny_bert, tiny_tokenizer
from transformers import AutoModelForTokenClassification

from prune_trainer import MagnitudePruningCallback, export_pruned_model
from prune_trainer.masking import MaskedLinear


def test_export_round_trip_gives_same_predictions(tmp_path):
    model = tiny_bert()
    pruner = MagnitudePruningCallback(model, final_sparsity=0.6, start_step=0, end_step=4, frequency=2)
    make_trainer(tmp_path / "train", model, [pruner], max_steps=6).train()
    model.eval()
    tok = tiny_tokenizer()
    batch = tok([["alvo", "went", "to", "ostra"], ["korp", "said"]], is_split_into_words=True, padding=True,
                return_tensors="pt")
    with torch.no_grad():
        before = model(**batch).logits

    report = export_pruned_model(model, tmp_path / "export", tok, method="magnitude", config={"k": 1})
    assert not any(isinstance(m, MaskedLinear) for m in model.modules())
    reloaded = AutoModelForTokenClassification.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        after = reloaded(**batch).logits
    torch.testing.assert_close(after, before)
    # No mask buffers in the checkpoint: a plain architecture.
    assert not any(k.endswith("weight_mask") for k in reloaded.state_dict())

    on_disk = json.loads((tmp_path / "export" / "sparsity.json").read_text())
    assert on_disk["method"] == "magnitude" and on_disk["pattern"] == "unstructured"
    assert abs(on_disk["global_sparsity"] - 0.6) < 1e-3
    assert len(on_disk["per_layer"]) == 12
    assert on_disk == json.loads(json.dumps(report))
    # The report is measured on the weights: recount from the reloaded model.
    zeros = sum(int((reloaded.get_submodule(n).weight == 0).sum()) for n in on_disk["per_layer"])
    assert zeros == on_disk["num_zeros"]


def test_export_is_atomic_and_complete_dirs_are_recognised(tmp_path, monkeypatch):
    from prune_trainer.export import is_complete_model_dir

    tok = tiny_tokenizer()
    path = tmp_path / "model"
    export_pruned_model(tiny_bert(), path, tok, method="dense")
    assert is_complete_model_dir(path)
    before = sorted(p.name for p in path.iterdir())

    def killed(self, *args, **kwargs):
        raise KeyboardInterrupt  # the export dies after the weights, before the tokenizer and sparsity.json

    monkeypatch.setattr(type(tok), "save_pretrained", killed)
    try:
        export_pruned_model(tiny_bert(seed=1), path, tok, method="again")
    except KeyboardInterrupt:
        pass
    assert sorted(p.name for p in path.iterdir()) == before  # the old complete export is kept
    assert json.loads((path / "sparsity.json").read_text())["method"] == "dense"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no half-written sibling left
    for name in ("sparsity.json", "model.safetensors", "tokenizer.json"):
        (path / name).rename(tmp_path / name)
        assert not is_complete_model_dir(path), name
        (tmp_path / name).rename(path / name)
    assert is_complete_model_dir(path)
