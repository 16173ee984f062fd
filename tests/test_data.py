import numpy as np
import pytest
from helpers import synthetic_sentences, tiny_tokenizer, write_conll_dir, write_conll_file
from seqeval.metrics import classification_report

from prune_trainer.data import (
    CONLL_LABELS,
    IGNORE_INDEX,
    ConllFormatError,
    Sentence,
    align_predictions,
    entity_scores,
    load_conll_splits,
    read_conll_file,
    resolve_data_dir,
    tokenize_and_align,
)


def test_reader_handles_docstart_and_blank_lines(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text(
        "-DOCSTART- -X- -X- O\n\n"
        "Alvo NNP B-NP B-PER\nwent VBD B-VP O\n\n\n"
        "-DOCSTART- -X- -X- O\n"
        "Korp NNP B-NP B-ORG\nLumen NNP I-NP I-ORG\n"  # no trailing blank line
    )
    sents = read_conll_file(path)
    assert [s.tokens for s in sents] == [["Alvo", "went"], ["Korp", "Lumen"]]
    assert [s.tags for s in sents] == [["B-PER", "O"], ["B-ORG", "I-ORG"]]


def test_malformed_line_names_file_and_line(tmp_path):
    path = tmp_path / "valid.txt"
    path.write_text("Alvo NNP B-NP B-PER\nbroken line\n")
    with pytest.raises(ConllFormatError, match=r"valid\.txt:2: expected 4"):
        read_conll_file(path)
    path.write_text("Alvo NNP B-NP B-PER\n\nKorp NNP B-NP B-COMPANY\n")
    with pytest.raises(ConllFormatError, match=r"valid\.txt:3: unknown NER tag 'B-COMPANY'"):
        read_conll_file(path)


def test_data_dir_from_argument_and_env(tmp_path, monkeypatch):
    root = write_conll_dir(tmp_path / "d", n_train=10, n_valid=5, n_test=4)
    splits = load_conll_splits(root)
    assert {k: len(v) for k, v in splits.items()} == {"train": 10, "validation": 5, "test": 4}
    monkeypatch.setenv("PRUNE_TRAINER_CONLL_DIR", str(root))
    assert resolve_data_dir(None) == root
    no_test = write_conll_dir(tmp_path / "e", n_train=3, n_valid=2)
    assert set(load_conll_splits(no_test)) == {"train", "validation"}


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_data_dir(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    write_conll_file(tmp_path / "half" / "train.txt", synthetic_sentences(2))
    with pytest.raises(FileNotFoundError, match="has no valid.txt"):
        resolve_data_dir(tmp_path / "half")


def test_first_subtoken_carries_the_label():
    tok = tiny_tokenizer()
    # "korps" → korp ##s ; "alvox" → alvo ##x
    sents = [Sentence(["korps", "went", "alvox", "."], ["B-ORG", "O", "B-PER", "O"])]
    ds = tokenize_and_align(sents, tok, max_length=16)
    tokens = tok.convert_ids_to_tokens(ds[0]["input_ids"])
    assert tokens == ["[CLS]", "korp", "##s", "went", "alvo", "##x", ".", "[SEP]"]
    lab = CONLL_LABELS.index
    assert ds[0]["labels"] == [IGNORE_INDEX, lab("B-ORG"), IGNORE_INDEX, lab("O"), lab("B-PER"), IGNORE_INDEX,
                               lab("O"), IGNORE_INDEX]


def test_max_length_and_max_samples():
    tok = tiny_tokenizer()
    sents = [Sentence(t, g) for t, g in synthetic_sentences(20)]
    ds = tokenize_and_align(sents, tok, max_length=6, max_samples=7)
    assert len(ds) == 7
    assert max(len(x) for x in ds["input_ids"]) <= 6
    with pytest.raises(ValueError, match="max_samples must be positive"):
        tokenize_and_align(sents, tok, max_samples=0)


def test_entity_scores_match_seqeval_report():
    true = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    scores = entity_scores(true, pred)
    report = classification_report(true, pred, output_dict=True)
    assert scores["f1"] == pytest.approx(report["micro avg"]["f1-score"])
    assert scores["precision"] == pytest.approx(2 / 3)
    assert scores["recall"] == pytest.approx(2 / 3)


def test_align_predictions_drops_ignored_positions():
    labels = np.array([[IGNORE_INDEX, 1, IGNORE_INDEX, 0]])
    logits = np.zeros((1, 4, len(CONLL_LABELS)))
    logits[0, 1, 1] = 5
    logits[0, 3, 3] = 5
    true, pred = align_predictions(logits, labels)
    assert true == [["B-PER", "O"]] and pred == [["B-PER", "B-ORG"]]
