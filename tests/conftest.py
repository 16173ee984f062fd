import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import tiny_bert, tiny_tokenizer, write_conll_dir  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread per test (restored after): tiny tensors on a 2-core machine run far faster so,
    because two OpenMP threads spin-wait on each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tokenizer(tmp_path):
    return tiny_tokenizer(tmp_path)


@pytest.fixture
def model():
    return tiny_bert()


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A tiny BERT + tokenizer saved as a model directory (for recipes' ``model:``)."""
    path = tmp_path / "tiny-model"
    tiny_bert().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.fixture
def conll_dir(tmp_path):
    return write_conll_dir(tmp_path / "conll")


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
