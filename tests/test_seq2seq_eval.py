"""Seq2seq (T5) in the one-shot job: target-token perplexity, T5 span corruption, pair files, calibration."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from helpers import WORDS, tiny_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

from prune_trainer.cli import main
from prune_trainer.data.span_corruption import noise_span_lengths, sentinel_ids, span_corrupt, span_corruption_pairs
from prune_trainer.llm.seq2seq import (
    EVAL_SEED,
    evaluate_seq2seq,
    read_pairs,
    seq2seq_perplexity,
    span_corruption_batches,
    text_pairs,
)
from prune_trainer.oneshot.evaluation import TASK_EVALUATORS
from prune_trainer.oneshot.runner import OneShotConfig, run_oneshot

N_SENTINELS = 16


def t5_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer laid out like T5's: ``<pad>`` 0, ``</s>`` 1 (appended to every text), ``<unk>`` 2,
    the words, then the sentinels with ``<extra_id_0>`` as the last id."""
    words = sorted({w for ws in WORDS.values() for w in ws}) + [".", ","]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    sentinels = [f"<extra_id_{k}>" for k in range(N_SENTINELS)]
    vocab.update({s: len(words) + 3 + N_SENTINELS - 1 - k for k, s in enumerate(sentinels)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                                   additional_special_tokens=sentinels)


def tiny_t5(vocab_size: int, seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=16, d_kv=8, d_ff=32, num_layers=2, num_heads=2,
                      relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(config).eval()


@pytest.fixture
def t5_dir(tmp_path):
    tok = t5_tokenizer()
    path = tmp_path / "t5"
    tiny_t5(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _pairs(n: int = 7, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    return [([rng.randrange(3, 40) for _ in range(rng.randint(2, 9))] + [1],
             [rng.randrange(3, 40) for _ in range(rng.randint(1, 6))] + [1]) for _ in range(n)]


def test_perplexity_equals_a_pair_by_pair_hand_computation():
    model = tiny_t5(len(t5_tokenizer()))
    pairs = _pairs()
    total, count = 0.0, 0
    with torch.no_grad():
        for source, target in pairs:  # one pair at a time: no padding; the model shifts the labels itself
            logits = model(input_ids=torch.tensor([source]), labels=torch.tensor([target])).logits[0]
            total += float(F.cross_entropy(logits, torch.tensor(target), reduction="sum"))
            count += len(target)
    r = seq2seq_perplexity(model, pairs, pad_id=0, batch_size=3)  # padded batches of different lengths
    assert r.n_tokens == count == sum(len(t) for _, t in pairs) and r.n_pairs == len(pairs)
    assert r.nll == pytest.approx(total / count, rel=1e-5)
    assert r.perplexity == pytest.approx(math.exp(total / count), rel=1e-5)
    assert seq2seq_perplexity(model, pairs, pad_id=0, batch_size=1).perplexity == pytest.approx(r.perplexity,
                                                                                                rel=1e-5)


def _restore(source: list[int], target: list[int], sentinels: list[int]) -> list[int]:
    """Each sentinel of the source replaced by the tokens that follow it in the target."""
    index = {s: k for k, s in enumerate(sentinels)}
    spans: dict[int, list[int]] = {}
    for tok in target:
        if tok in index:
            current = spans.setdefault(index[tok], [])
        else:
            current.append(tok)
    return [t for tok in source for t in (spans[index[tok]] if tok in index else [tok])]


@pytest.mark.parametrize("length", [2, 5, 16, 128, 257])
def test_span_corruption_reconstructs_the_tokens(length):
    sentinels = [1000 + k for k in range(100)]
    ids = list(range(3, 3 + length))
    source, target = span_corrupt(ids, sentinels, random.Random(1))
    assert _restore(source, target, sentinels) == ids
    n_spans = sum(t in sentinels for t in target)
    assert [t for t in source if t in sentinels] == [t for t in target if t in sentinels] == sentinels[:n_spans]
    assert source[-1] == sentinels[n_spans - 1] and target[0] == sentinels[0]  # noise last, non-noise first
    assert len(target) - n_spans == min(max(round(0.15 * length), 1), length - 1)


def test_span_corruption_noise_density_span_length_and_seed():
    rng = random.Random(0)
    keep, noise = zip(*(noise_span_lengths(100, rng) for _ in range(200)), strict=True)
    assert all(sum(k) + sum(n) == 100 and min(k) >= 1 and min(n) >= 1 for k, n in zip(keep, noise, strict=True))
    assert sum(map(sum, noise)) / (200 * 100) == pytest.approx(0.15)  # round(0.15 * 100) noise tokens each
    assert sum(map(sum, noise)) / sum(map(len, noise)) == pytest.approx(3.0)  # 15 tokens in round(15/3) spans
    tok = t5_tokenizer()
    chunks = torch.randint(3, 30, (6, 40), generator=torch.Generator().manual_seed(0))
    a = span_corruption_pairs(chunks, tok, seed=3)
    assert a == span_corruption_pairs(chunks, tok, seed=3) and a != span_corruption_pairs(chunks, tok, seed=4)
    sentinels = sentinel_ids(tok)
    assert sentinels[0] == len(tok) - 1  # <extra_id_0> is T5's last id
    for (source, target), row in zip(a, chunks.tolist(), strict=True):
        assert source[-1] == target[-1] == tok.eos_token_id  # both end with EOS, as T5's pre-training data
        assert _restore(source[:-1], target[:-1], sentinels) == row
        assert len(target) - 1 - sum(t in sentinels for t in target) == 6  # round(0.15 * 40) noise tokens


def test_default_eval_pairs_are_the_validation_text_corrupted_with_the_fixed_seed(tmp_path, conll_dir):
    from prune_trainer.data.conll import load_conll_splits
    from prune_trainer.data.text import sentences_text, tokenize_text

    tok = t5_tokenizer()
    splits = load_conll_splits(conll_dir)
    model = tiny_t5(len(tok))
    cfg = OneShotConfig(model="unused", max_length=16, eval_batch_size=4)
    res = evaluate_seq2seq(model, tok, splits, cfg)
    ids = tokenize_text(sentences_text(splits["validation"]), tok)
    pairs = text_pairs(ids, tok, 16, EVAL_SEED)
    assert res["eval_pairs"] == len(pairs) == ids.numel() // 16 > 1
    assert res["eval_tokens"] == sum(len(t) for _, t in pairs)
    assert res["eval_perplexity"] == pytest.approx(seq2seq_perplexity(model, pairs, 0, 2).perplexity, rel=1e-5)
    assert math.isfinite(res["eval_perplexity"]) and res["eval_perplexity"] > 1


def test_bad_pair_lines_name_file_and_line_before_any_work(tmp_path, t5_dir, conll_dir):
    good = json.dumps({"source": "the red korp", "target": "alvo"})
    for body, line in ((f"{good}\n\n{{not json\n", 3), (f'{good}\n{{"source": "a"}}\n', 2),
                       (f'{{"source": "a", "target": 3}}\n{good}\n', 1)):
        path = tmp_path / "eval.jsonl"
        path.write_text(body)
        with pytest.raises(ValueError, match=rf"eval\.jsonl:{line}: "):
            read_pairs(path)
        cfg = OneShotConfig(model=str(t5_dir), calib_samples=4, data_dir=str(conll_dir), eval_file=str(path),
                            output_dir=str(tmp_path / "out"))
        with pytest.raises(ValueError, match=rf"eval\.jsonl:{line}: "):
            run_oneshot(cfg, progress=False)
        assert not (tmp_path / "out").exists()
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no \\(source, target\\) pairs"):
        read_pairs(tmp_path / "empty.jsonl")


def test_eval_file_pairs(tmp_path, t5_dir, conll_dir):
    rows = [{"source": "the red korp went to ostra", "target": "alvo said"}, {"source": "a big umbra", "target":
            "korp . korp , korp the red korp went to ostra"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    tok = t5_tokenizer()
    model = T5ForConditionalGeneration.from_pretrained(t5_dir).eval()
    cfg = OneShotConfig(model=str(t5_dir), eval_file=str(path), max_length=8)
    res = evaluate_seq2seq(model, tok, {}, cfg)
    pairs = [(tok(r["source"]).input_ids, tok(text_target=r["target"]).input_ids) for r in rows]
    pairs = [(s[:7] + [1] if len(s) > 8 else s, t[:7] + [1] if len(t) > 8 else t) for s, t in pairs]  # keep EOS
    assert res["eval_truncated_pairs"] == 1 and res["eval_tokens"] == 3 + 8 and res["eval_pairs"] == 2
    assert res["eval_perplexity"] == pytest.approx(seq2seq_perplexity(model, pairs, 0).perplexity, rel=1e-5)


def test_span_corruption_calibration_batches():
    tok = t5_tokenizer()
    model = tiny_t5(len(tok))
    ids = torch.randint(3, 30, (300,), generator=torch.Generator().manual_seed(0))
    batches = span_corruption_batches(model, tok, ids, n_samples=5, batch_size=2, seqlen=20, seed=0)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1] and "labels" not in batches[0]
    for b in batches:  # 20 tokens: 3 noise tokens in 1 span; source 17 + sentinel + EOS, target sentinel + 3 + EOS
        assert b["input_ids"].shape[1] == 19 and b["decoder_input_ids"].shape[1] == 5
        assert bool(b["attention_mask"].all()) and bool(b["decoder_attention_mask"].all())
        assert (b["decoder_input_ids"][:, 0] == 0).all()  # decoder_start_token_id, then the target shifted right
        assert (b["decoder_input_ids"][:, 1] == sentinel_ids(tok)[0]).all()


def test_seq2seq_evaluator_is_registered_and_needs_sentinels_without_a_file(tmp_path, conll_dir):
    assert TASK_EVALUATORS["seq2seq"] is evaluate_seq2seq
    path = tmp_path / "t5-bert-tok"  # a T5 with a tokenizer that has no <extra_id_k>
    tok = tiny_tokenizer()
    tiny_t5(len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    cfg = OneShotConfig(model=str(path), calib_samples=4, data_dir=str(conll_dir), output_dir=str(tmp_path / "o"))
    with pytest.raises(ValueError, match="no sentinel tokens.*--eval-file"):
        run_oneshot(cfg, progress=False)
    assert not (tmp_path / "o").exists()
    res = run_oneshot(cfg.replace(evaluate=False, export=False), progress=False)  # sentence calibration, as before
    assert res["calib_tokens"] > 0 and "eval_perplexity" not in res


def test_oneshot_t5_dense_perplexity_equals_the_evaluator(tmp_path, t5_dir, conll_dir, capsys):
    common = ["--model", str(t5_dir), "--task", "seq2seq", "--calib-samples", "8", "--max-length", "16",
              "--data-dir", str(conll_dir)]
    rc = main(["oneshot", *common, "--method", "magnitude", "--sparsity", "0", "--output-dir", str(tmp_path / "d")])
    assert rc == 0
    dense = json.loads((tmp_path / "d" / "results.json").read_text())
    from prune_trainer.data.conll import load_conll_splits

    model = T5ForConditionalGeneration.from_pretrained(t5_dir).eval()  # the unpruned model
    direct = evaluate_seq2seq(model, t5_tokenizer(), load_conll_splits(conll_dir),
                              OneShotConfig(model=str(t5_dir), max_length=16))
    assert dense["task"] == "seq2seq" and dense["sparsity"] == 0.0
    assert dense["eval_perplexity"] == pytest.approx(direct["eval_perplexity"], rel=1e-6)
    assert dense["eval_tokens"] == direct["eval_tokens"] and dense["eval_pairs"] == direct["eval_pairs"]
    capsys.readouterr()
    rc = main(["oneshot", *common, "--method", "sparsegpt", "--sparsity", "0.5", "--no-export",
               "--output-dir", str(tmp_path / "s")])
    assert rc == 0
    pruned = json.loads(capsys.readouterr().out.strip().splitlines()[-1])  # the line the CLI prints
    assert pruned["sparsity"] == pytest.approx(0.5, abs=0.01) and math.isfinite(pruned["eval_perplexity"])
    assert pruned["eval_tokens"] == dense["eval_tokens"]
    written = json.loads((tmp_path / "s" / "results.json").read_text())
    assert written["calib_tokens"] == 8 * 16  # 8 span-corrupted 16-token windows: 14 kept + 1 sentinel + EOS
