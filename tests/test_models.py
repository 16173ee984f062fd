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


def test_directory_without_weights_is_a_clear_error(tmp_path):
    """An interrupted export (config.json written, weights not) is not a model."""
    from helpers import tiny_bert_config

    path = tmp_path / "half"
    path.mkdir()
    tiny_bert_config().to_json_file(path / "config.json")
    with pytest.raises(FileNotFoundError, match="holds no model weights"):
        resolve_model_path(path)


def test_classifier_label_count_and_token_head_checks():
    from helpers import tiny_bert_config
    from transformers import BertConfig

    from prune_trainer.models import check_model_labels

    check_model_labels(tiny_bert_config(architectures=["BertForTokenClassification"]), "m", require_token_head=True)
    check_model_labels(BertConfig(architectures=["BertModel"]), "base")  # a new head is fine for training
    with pytest.raises(ValueError, match="'s2' has a classifier with 2 labels .*CoNLL-2003 needs 9"):
        check_model_labels(BertConfig(architectures=["BertForSequenceClassification"]), "s2")
    with pytest.raises(ValueError, match="'base' is not a token-classification checkpoint"):
        check_model_labels(BertConfig(architectures=["BertModel"]), "base", require_token_head=True)


def test_oneshot_on_a_base_checkpoint_is_a_clear_error(tmp_path, conll_dir, capsys):
    from helpers import tiny_bert_config
    from transformers import BertModel

    base = tmp_path / "base"
    BertModel(tiny_bert_config()).save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    rc = main(["oneshot", "--model", str(base), "--data-dir", str(conll_dir), "--output-dir", str(tmp_path / "o")])
    assert rc == 2
    assert "is not a checkpoint with a task head (architectures: ['BertModel'])" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_oneshot_default_output_folder_names_model_and_seed(tmp_path, tiny_model_dir, conll_dir, monkeypatch, capsys):
    import json

    monkeypatch.chdir(tmp_path)
    rc = main(["oneshot", "--model", str(tiny_model_dir) + "/", "--method", "magnitude", "--calib-samples", "4",
               "--seed", "3", "--no-eval", "--data-dir", str(conll_dir)])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["output_dir"]
    assert out == "results/oneshot/tiny-model_magnitude_unstructured_0.5_n4_seed3"
    assert (tmp_path / out / "results.json").is_file() and (tmp_path / out / "model" / "sparsity.json").is_file()
