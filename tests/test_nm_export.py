"""N:M export: plain checkpoint round trip keeps 2:4, compliance report, semi-structured conversion on CPU."""

import json

import pytest
import torch
from helpers import make_trainer, tiny_bert
from torch import nn
from transformers import AutoModelForTokenClassification

from prune_trainer.callbacks.nm import NMSparsityCallback
from prune_trainer.config import PruningConfig
from prune_trainer.export import export_pruned_model
from prune_trainer.export.semi_structured import (
    is_nm_sparse,
    nm_compliance_report,
    require_semi_structured_support,
    to_semi_structured,
)
from prune_trainer.schedules.schedule import PruningSchedule


def test_export_round_trip_keeps_2_4_and_outputs(tmp_path):
    model = tiny_bert()
    pruner = NMSparsityCallback(model, PruningConfig(method="nm", schedule=PruningSchedule(kind="oneshot")))
    make_trainer(tmp_path / "run", model, [pruner], max_steps=3).train()
    layer_names = list(pruner.layers)
    model.eval()
    ids = torch.randint(5, 30, (2, 9))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    report = export_pruned_model(model, tmp_path / "export", method="nm", pattern="2:4")
    assert report["global_sparsity"] == pytest.approx(0.5)
    assert json.loads((tmp_path / "export" / "sparsity.json").read_text())["pattern"] == "2:4"

    reloaded = AutoModelForTokenClassification.from_pretrained(tmp_path / "export").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected)
    compliance = nm_compliance_report(reloaded, 2, 4)
    assert set(layer_names) <= set(compliance["compliant"])
    assert "classifier" in compliance["not_compliant"]  # left dense by design, listed with its reason
    for name in layer_names:
        w = reloaded.get_submodule(name).weight
        assert int((w != 0).reshape(w.shape[0], -1, 4).sum(-1).max()) <= 2


def test_compliance_report_reasons():
    model = nn.Sequential(nn.Linear(6, 2), nn.Linear(8, 2), nn.Linear(8, 2))
    with torch.no_grad():
        model[2].weight.copy_(torch.tensor([[1.0, 0, 2, 0, 0, 0, 3, 4], [0, 0, 0, 0, 1, 0, 0, 0]]))
    report = nm_compliance_report(model, 2, 4)
    assert report["compliant"] == ["2"]
    assert "not divisible by 4" in report["not_compliant"]["0"]
    assert "4 > 2" in report["not_compliant"]["1"]
    assert is_nm_sparse(model[2].weight) and not is_nm_sparse(model[1].weight)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error path")
def test_semi_structured_on_cpu_fails_clearly():
    with pytest.raises(RuntimeError, match="CUDA GPU of compute capability"):
        require_semi_structured_support("cpu")
    with pytest.raises(RuntimeError, match="CUDA GPU of compute capability"):
        to_semi_structured(nn.Sequential(nn.Linear(64, 64)))


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8, reason="needs an Ampere+ GPU"
)
def test_semi_structured_matches_dense_on_gpu():
    torch.manual_seed(0)
    lin = nn.Linear(128, 128).half().cuda()
    with torch.no_grad():
        lin.weight.mul_(torch.tensor([1, 0, 1, 0], device="cuda", dtype=torch.half).repeat(128, 32))
    model = nn.Sequential(lin).eval()
    x = torch.randn(64, 128, device="cuda", dtype=torch.half)
    with torch.no_grad():
        dense = model(x)
        report = to_semi_structured(model)
        sparse = model(x)
    assert report["converted"] == ["0"]
    torch.testing.assert_close(sparse, dense, atol=1e-2, rtol=1e-2)
