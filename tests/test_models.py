"""Model and data source resolution: local paths are checked, hub ids pass through, failures say what to do."""

import pytest
from helpers import tiny_bert, tiny_tokenizer

from prune_trainer.cli import main
from prune_trainer.data import conll
from prune_trainer.models import load_model_and_tokenizer, looks_like_local_path, resolve_model_path


@pytest.mark.parametrize("name", ["bert-base-cased", "google-bert/bert-base-cased", "prajjwal1/bert-tiny"])
def test_hub_ids_pass_through(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_like_local_path(name)
    assert resolve_model_path(name) == name


@pytest.mark.parametrize("name", ["/nonexistent/model", "./dense", "../dense", "~/no-such-model-dir",
                                  "results/dense/model", "dense/"])
def test_missing_local_paths_are_clear_errors(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert looks_like_local_path(name)
    with pytest.raises(FileNotFoundError, match=f"model '{name}': no such directory"):
        load_model_and_tokenizer(name)


def test_directory_without_config_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no config.json"):
        resolve_model_path(tmp_path / "empty")


def test_saved_model_directory_loads_relative_to_cwd(tmp_path, monkeypatch):
    tiny_bert().save_pretrained(tmp_path / "runs" / "dense" / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "runs" / "dense" / "model")
    monkeypatch.chdir(tmp_path)
    model, tok = load_model_and_tokenizer("runs/dense/model")
    assert model.config.hidden_size == 32 and tok.vocab_size > 0


def test_oneshot_cli_names_a_missing_model(tmp_path, capsys):
    rc = main(["oneshot", "--model", str(tmp_path / "missing"), "--method", "wanda", "--sparsity", "0.5",
               "--output-dir", str(tmp_path / "out")])
    assert rc == 2
    assert f"model '{tmp_path / 'missing'}': no such directory" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unreachable_hub_dataset_says_how_to_use_a_local_directory(monkeypatch):
    import datasets

    def offline(name, *args, **kwargs):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.delenv("PRUNE_TRAINER_CONLL_DIR", raising=False)
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match="set PRUNE_TRAINER_CONLL_DIR") as err:
        conll.load_conll_splits(None)
    assert "Couldn't reach 'eriktks/conll2003'" in str(err.value)


def test_missing_distillation_teacher_is_named():
    from prune_trainer.callbacks.distillation import make_distillation_callback

    with pytest.raises(FileNotFoundError, match="distillation.teacher: model '/nonexistent/teacher': no such"):
        make_distillation_callback(tiny_bert(), {"teacher": "/nonexistent/teacher"}, None)
