"""Test helpers: tiny random BERT models, a tiny fast tokenizer, synthetic CoNLL files.

The synthetic sentences are generated here (made-up words): no CoNLL-2003 text is in the repo.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import BertConfig, BertForTokenClassification, BertTokenizerFast

from prune_trainer.data.conll import CONLL_LABELS

WORDS = {
    "PER": ["alvo", "brin", "cato", "dura", "esko", "fenn"],
    "ORG": ["korp", "lumen", "mavic", "norda"],
    "LOC": ["ostra", "pella", "quarn", "rovi"],
    "MISC": ["sabic", "tolli", "umbra"],
    "O": ["the", "a", "went", "to", "said", "of", "in", "and", "was", "on", "new", "big", "red"],
}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_vocab() -> list[str]:
    words = sorted({w for ws in WORDS.values() for w in ws})
    return SPECIAL + words + [".", ",", "##s", "##x"]


def tiny_tokenizer(tmp_path: Path | None = None) -> BertTokenizerFast:
    """A fast WordPiece tokenizer over `tiny_vocab` (``tmp_path`` is unused, kept for fixtures)."""
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(tiny_vocab())}, do_lower_case=True)


def tiny_bert_config(**overrides) -> BertConfig:
    cfg = dict(
        vocab_size=len(tiny_vocab()), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, num_labels=len(CONLL_LABELS),
        id2label=dict(enumerate(CONLL_LABELS)), label2id={lab: i for i, lab in enumerate(CONLL_LABELS)},
    )
    cfg.update(overrides)
    return BertConfig(**cfg)


def tiny_bert(seed: int = 0, **overrides) -> BertForTokenClassification:
    torch.manual_seed(seed)
    return BertForTokenClassification(tiny_bert_config(**overrides))


def synthetic_sentences(n: int, seed: int = 0) -> list[tuple[list[str], list[str]]]:
    """Random sentences whose entity words follow a learnable rule (word → type)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        tokens, tags = [], []
        for _ in range(rng.randint(3, 10)):
            kind = rng.choice(["O", "O", "O", "PER", "ORG", "LOC", "MISC"])
            if kind == "O":
                tokens.append(rng.choice(WORDS["O"]))
                tags.append("O")
            else:
                span = rng.randint(1, 2)
                for j in range(span):
                    tokens.append(rng.choice(WORDS[kind]))
                    tags.append(("B-" if j == 0 else "I-") + kind)
        tokens.append(".")
        tags.append("O")
        out.append((tokens, tags))
    return out


def write_conll_file(path: Path, sentences: list[tuple[list[str], list[str]]]) -> None:
    lines = ["-DOCSTART- -X- -X- O", ""]
    for tokens, tags in sentences:
        for tok, tag in zip(tokens, tags):
            lines.append(f"{tok} NN I-NP {tag}")
        lines.append("")
    Path(path).write_text("\n".join(lines) + "\n")


def write_conll_dir(root: Path, n_train: int = 64, n_valid: int = 32, n_test: int | None = None) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    write_conll_file(root / "train.txt", synthetic_sentences(n_train, seed=1))
    write_conll_file(root / "valid.txt", synthetic_sentences(n_valid, seed=2))
    if n_test:
        write_conll_file(root / "test.txt", synthetic_sentences(n_test, seed=3))
    return root


def tiny_datasets(n_train: int = 64, n_valid: int = 32, max_length: int = 32):
    """Tokenized synthetic train/validation sets for the tiny tokenizer."""
    from prune_trainer.data import Sentence, tokenize_and_align

    tok = tiny_tokenizer()
    train = [Sentence(t, g) for t, g in synthetic_sentences(n_train, seed=1)]
    valid = [Sentence(t, g) for t, g in synthetic_sentences(n_valid, seed=2)]
    return tokenize_and_align(train, tok, max_length), tokenize_and_align(valid, tok, max_length), tok


def make_trainer(output_dir, model, callbacks=(), n_train: int = 64, **training_args):
    """A plain `Trainer` on the synthetic data with the tiny tokenizer (CPU, no reporting)."""
    from transformers import DataCollatorForTokenClassification, Trainer, TrainingArguments

    from prune_trainer.data import make_compute_metrics, preprocess_logits_for_metrics

    train_ds, valid_ds, tok = tiny_datasets(n_train)
    defaults = dict(
        output_dir=str(output_dir), max_steps=20, per_device_train_batch_size=8, per_device_eval_batch_size=16,
        learning_rate=5e-3, weight_decay=0.1, logging_steps=5, save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    defaults.update(training_args)
    return Trainer(
        model=model,
        args=TrainingArguments(**defaults),
        train_dataset=train_ds,
        eval_dataset=valid_ds,
        data_collator=DataCollatorForTokenClassification(tok),
        processing_class=tok,
        compute_metrics=make_compute_metrics(),
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        callbacks=list(callbacks),
    )


def end_process_group() -> None:
    """Barrier, then destroy the gloo group while Python is still whole.

    Exiting with the group alive can abort a rank at interpreter teardown ("terminate called without an active
    exception", SIGABRT; seen once in CI). Used by every DDP test worker.
    """
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def zero_ffn_neurons(model, keep: int) -> None:
    """Zero every FFN neuron of a BERT beyond the first ``keep``: rows of W1 (and b1) and columns of W2, so that a
    structured export removes them."""
    import torch

    with torch.no_grad():
        for layer in model.bert.encoder.layer:
            layer.intermediate.dense.weight[keep:] = 0
            layer.intermediate.dense.bias[keep:] = 0
            layer.output.dense.weight[:, keep:] = 0
