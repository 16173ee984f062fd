import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from helpers import tiny_bert, tiny_tokenizer, write_conll_dir  # noqa: E402

torch.set_num_threads(1)  # the machine has 2 cores; tiny models gain nothing from more


@pytest.fixture
def tokenizer(tmp_path):
    return tiny_tokenizer(tmp_path)


@pytest.fixture
def model():
    return tiny_bert()


@pytest.fixture
def conll_dir(tmp_path):
    return write_conll_dir(tmp_path / "conll")


@pytest.fixture(autouse=True)
def _offline_env(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
