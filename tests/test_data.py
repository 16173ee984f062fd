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


def _long_sentence(n_words=600):
    """One sentence of ``n_words`` words made of synthetic sentences (entities throughout, one word split into
    several sub-tokens every so often)."""
    tokens, tags = [], []
    for toks, tgs in synthetic_sentences(200, seed=5):
        tokens += toks
        tags += tgs
    tokens, tags = tokens[:n_words], tags[:n_words]
    tokens[7] = "alvoxxxxs"  # several sub-tokens
    return Sentence(tokens, tags)


def test_non_utf8_byte_names_file_and_line(tmp_path):
    path = tmp_path / "train.txt"
    path.write_bytes(b"-DOCSTART- -X- -X- O\n\nthe NN I-NP O\ncaf\xe9 NN I-NP B-LOC\n")
    with pytest.raises(ConllFormatError, match=r"train\.txt:4: not UTF-8 \(byte 0xe9"):
        read_conll_file(path)


def test_split_with_only_docstart_is_an_error_naming_the_file(tmp_path):
    root = write_conll_dir(tmp_path / "c")
    (root / "valid.txt").write_text("-DOCSTART- -X- -X- O\n\n")
    with pytest.raises(ConllFormatError, match=r"valid\.txt: the validation split holds no sentence"):
        load_conll_splits(root)


def test_windows_cover_a_600_word_sentence_and_stitch_back():
    from prune_trainer.data import stitch_windows, window_sentences

    tok = tiny_tokenizer()
    long = _long_sentence()
    short = [Sentence(t, g) for t, g in synthetic_sentences(3, seed=2)]
    windows, groups = window_sentences([short[0], long, *short[1:]], tok, max_length=32)
    assert windows[0] is short[0] and windows[-2:] == short[1:]  # short sentences are untouched
    assert groups[0] == 0 and groups[-2:] == [2, 3] and set(groups[1:-2]) == {1} and len(groups) > 20
    ds = tokenize_and_align(windows, tok, max_length=32)
    assert max(len(ids) for ids in ds["input_ids"]) <= 32
    assert [w for win in windows[1:-2] for w in win.tokens] == long.tokens  # word-aligned, nothing dropped
    assert any(win.tags[0].startswith("I-") for win in windows[1:-2])  # an entity cut by a window boundary
    # Gold labels as predictions: the stitched sentences are exactly the original tag sequences (an entity cut
    # by a window boundary is one entity again), so every gold entity is scored.
    true_tags, _ = align_predictions(np.array([row + [-100] * (32 - len(row)) for row in ds["labels"]]),
                                     np.array([row + [-100] * (32 - len(row)) for row in ds["labels"]]))
    stitched = stitch_windows(true_tags, groups)
    assert stitched == [short[0].tags, long.tags, *(s.tags for s in short[1:])]
    assert entity_scores(stitched, stitched)["recall"] == 1.0


def test_short_sentences_tokenize_byte_identically_through_windows():
    from prune_trainer.data import window_sentences

    tok = tiny_tokenizer()
    sents = [Sentence(t, g) for t, g in synthetic_sentences(40, seed=3)]
    windows, groups = window_sentences(sents, tok, max_length=64)
    assert windows == sents and groups == list(range(40))
    assert tokenize_and_align(windows, tok, 64).to_dict() == tokenize_and_align(sents, tok, 64).to_dict()


def test_evaluation_scores_every_gold_entity_of_a_long_sentence(tmp_path, tiny_model_dir, monkeypatch):
    """The runner's validation and the one-shot evaluation both see the 600 gold tags of the long sentence."""
    import yaml

    from prune_trainer.cli import main
    from prune_trainer.data import metrics as metrics_module
    from prune_trainer.oneshot import evaluation

    seen = []

    def capture(true_tags, pred_tags):
        seen.append(true_tags)
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": 0.0}

    long = _long_sentence()
    root = write_conll_dir(tmp_path / "conll", n_train=16)
    write_conll_file(root / "valid.txt", [(long.tokens, long.tags)] + synthetic_sentences(2, seed=9))
    monkeypatch.setattr(metrics_module, "entity_scores", capture)
    monkeypatch.setattr(evaluation, "entity_scores", capture)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "r", "data": {"max_length": 32}, "pruning": None, "training": {
        "max_steps": 1, "per_device_train_batch_size": 8, "eval_strategy": "no", "use_cpu": True}}))
    assert main(["run", str(recipe), "--model", str(tiny_model_dir), "--data-dir", str(root),
                 "--results-dir", str(tmp_path / "results")]) == 0
    from helpers import tiny_bert

    evaluation.evaluate_f1(tiny_bert(), tiny_tokenizer(), [long], batch_size=4, max_length=32)
    assert len(seen) == 2 and all(tags[0] == long.tags for tags in seen)
