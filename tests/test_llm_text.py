"""Text data for causal LMs (detokenising CoNLL, loading text, calibration windows) and perplexity against hand
computations on tiny models."""

import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from prune_trainer.data.conll import Sentence
from prune_trainer.data.text import detokenize, load_text, random_windows, sentences_text, tokenize_text
from prune_trainer.llm.perplexity import perplexity, perplexity_windows
from tests.helpers import write_conll_dir


def test_detokenize_punctuation_clitics_and_quotes():
    tokens = ["Germany", "'s", "chief", "(", "EU", ")", "said", '"', "we", "do", "n't", "agree", '"', ",", "up",
              "5", "%", "to", "$", "10", "."]
    assert detokenize(tokens) == "Germany's chief (EU) said \"we don't agree\", up 5% to $10."
    assert detokenize(['"', "Yes", '"', "he", "said"]) == '"Yes" he said'


def test_load_text_conll_and_file(tmp_path):
    data = write_conll_dir(tmp_path / "conll", n_train=5, n_valid=3)
    text = load_text("conll-validation", data)
    assert len(text.split("\n")) == 3
    path = tmp_path / "t.txt"
    path.write_text("hello world\n", encoding="utf-8")
    assert load_text(str(path)) == "hello world\n"
    with pytest.raises(FileNotFoundError, match="neither a file nor one of"):
        load_text(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="is empty"):
        load_text(str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="empty"):
        sentences_text([])
    assert sentences_text([Sentence(["a", "."], ["O", "O"])]) == "a."


def test_random_windows_are_seeded_slices():
    ids = torch.arange(100)
    w = random_windows(ids, 5, 7, seed=3)
    assert w.shape == (5, 7)
    assert torch.equal(w[:, 1:] - w[:, :-1], torch.ones(5, 6, dtype=torch.long))  # consecutive tokens
    assert torch.equal(w, random_windows(ids, 5, 7, seed=3))
    assert not torch.equal(w, random_windows(ids, 5, 7, seed=4))
    assert int(w.max()) <= 99
    with pytest.raises(ValueError, match="fewer than one window"):
        random_windows(torch.arange(5), 1, 7)
    with pytest.raises(ValueError, match="positive integers"):
        random_windows(ids, 0, 7)


def test_tokenize_text_adds_no_special_tokens(tokenizer):
    ids = tokenize_text("the cat", tokenizer)
    assert ids.dim() == 1 and tokenizer.cls_token_id not in ids.tolist()


class UniformLM(nn.Module):
    """Equal logits over ``vocab`` tokens: every next token has NLL log(vocab), so the perplexity is ``vocab``."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, **kwargs):
        return type("Out", (), {"logits": torch.zeros(*input_ids.shape, self.vocab) + self.dummy})


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def test_perplexity_of_uniform_model_is_vocab_size():
    ids = torch.randint(0, 13, (50,))
    result = perplexity(UniformLM(13), ids, seqlen=8, batch_size=3)
    assert result.perplexity == pytest.approx(13.0, rel=1e-6)
    assert result.n_windows == 6 and result.n_tokens == 6 * 7  # tail of 2 tokens dropped, first of each unscored


@torch.no_grad()
def hand_nll(model, ids, begin, end, score_from):
    """Σ −log p(x_t | x_begin..x_{t−1}) over t in [score_from, end), one position at a time from the logits."""
    logp = torch.log_softmax(model(ids[None, begin:end]).logits[0].double(), -1)
    return sum(-float(logp[t - begin - 1, ids[t]]) for t in range(score_from, end)), end - score_from


def test_perplexity_non_overlapping_matches_hand_computation():
    model, ids = tiny_llama(), torch.randint(0, 40, (45,), generator=torch.Generator().manual_seed(1))
    parts = [hand_nll(model, ids, b, b + 10, b + 1) for b in (0, 10, 20, 30)]
    expected = math.exp(sum(p[0] for p in parts) / sum(p[1] for p in parts))
    for bs in (1, 3):
        result = perplexity(model, ids, seqlen=10, batch_size=bs)
        assert result.perplexity == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, ids, seqlen=10, max_windows=1).perplexity == pytest.approx(
        math.exp(parts[0][0] / parts[0][1]), rel=1e-5)
    capped = perplexity(model, ids, seqlen=10, max_windows=2)  # windows 0 and 2 of 4: evenly spaced
    assert capped.perplexity == pytest.approx(math.exp((parts[0][0] + parts[2][0]) / 18), rel=1e-5)


def test_perplexity_strided_matches_hand_computation_and_hf_guide():
    model, ids = tiny_llama(1), torch.randint(0, 40, (23,), generator=torch.Generator().manual_seed(2))
    # windows of 10 every 4 tokens: [0,10) scores 1..9, [4,14) scores 10..13, ..., [16,23) scores 22 (text end)
    assert [(w.begin, w.end, w.score_from) for w in perplexity_windows(23, 10, 4)] == [
        (0, 10, 1), (4, 14, 10), (8, 18, 14), (12, 22, 18), (16, 23, 22)]
    parts = [hand_nll(model, ids, *w) for w in [(0, 10, 1), (4, 14, 10), (8, 18, 14), (12, 22, 18), (16, 23, 22)]]
    expected = math.exp(sum(p[0] for p in parts) / sum(p[1] for p in parts))
    result = perplexity(model, ids, seqlen=10, stride=4, batch_size=2)
    assert result.perplexity == pytest.approx(expected, rel=1e-5) and result.n_tokens == 22
    nll_sum, n = 0.0, 0  # the HF guide: labels of the overlapping context set to -100, model loss × scored count
    for w in perplexity_windows(23, 10, 4):
        labels = ids[None, w.begin : w.end].clone()
        labels[:, : w.score_from - w.begin] = -100
        with torch.no_grad():
            loss = model(ids[None, w.begin : w.end], labels=labels).loss
        nll_sum, n = nll_sum + float(loss) * (w.end - w.score_from), n + w.end - w.score_from
    assert result.perplexity == pytest.approx(math.exp(nll_sum / n), rel=1e-5)


def test_perplexity_rejects_bad_arguments_and_non_finite():
    model, ids = UniformLM(5), torch.zeros(20, dtype=torch.long)
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, ids, seqlen=8, stride=9)
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, ids, seqlen=32)
    with pytest.raises(ValueError, match="1-D"):
        perplexity(model, ids[None], seqlen=8)
    with torch.no_grad():
        model.dummy.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        perplexity(model, ids, seqlen=8)


def test_oneshot_job_on_a_causal_lm_reports_perplexity(tmp_path, conll_dir):
    """`run_oneshot` with task causal-lm: text-window calibration and the perplexity evaluator of the exported
    model's own logits (recomputed here from the reloaded export)."""
    from helpers import tiny_tokenizer

    from prune_trainer.data.text import text_calibration_batches
    from prune_trainer.oneshot.runner import OneShotConfig, run_oneshot

    path = tmp_path / "llama"
    tiny_llama(5).save_pretrained(path)
    tok = tiny_tokenizer()
    tok.save_pretrained(path)
    cfg = OneShotConfig(model=str(path), method="sparsegpt", sparsity=0.5, calib_samples=6, calib_batch_size=3,
                        max_length=16, eval_batch_size=2, data_dir=str(conll_dir), output_dir=str(tmp_path / "out"))
    res = run_oneshot(cfg, progress=False)
    assert res["task"] == "causal-lm" and res["calib_tokens"] == 6 * 16
    assert res["sparsity"] == pytest.approx(0.5, abs=0.01)
    pruned = LlamaForCausalLM.from_pretrained(tmp_path / "out" / "model").eval()
    ids = tokenize_text(load_text("conll-validation", conll_dir), tok)
    assert res["eval_perplexity"] == pytest.approx(perplexity(pruned, ids, seqlen=16).perplexity, rel=1e-5)
    assert res["eval_tokens"] == (ids.numel() // 16) * 15
    batches = text_calibration_batches([Sentence(["a", "b"] * 20, ["O", "O"] * 20)], tok, 4, 3, seqlen=8)
    assert [b["input_ids"].shape for b in batches] == [(3, 8), (1, 8)]


def test_cli_oneshot_causal_lm_prints_perplexity(tmp_path, conll_dir, capsys):
    import json

    from helpers import tiny_tokenizer

    from prune_trainer.cli import main

    path = tmp_path / "llama"
    tiny_llama(6).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    rc = main(["oneshot", "--model", str(path), "--method", "wanda", "--pattern", "2:4", "--max-length", "16",
               "--calib-samples", "4", "--calib-batch-size", "2", "--data-dir", str(conll_dir),
               "--output-dir", str(tmp_path / "out")])
    assert rc == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["task"] == "causal-lm" and line["sparsity"] == pytest.approx(0.5)
    assert math.isfinite(line["eval_perplexity"]) and line["eval_perplexity"] > 1


def test_wikitext_source_joins_lines_as_sparsegpt(monkeypatch):
    """The hub path (not reachable offline): the split is asked for by name and its lines joined with blank lines."""
    import datasets

    calls = []

    def fake_load_dataset(*args, split):
        calls.append((args, split))
        return {"text": [" = Title = \n", " Some text .\n"]}

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_text("wikitext2-test") == " = Title = \n\n\n Some text .\n"
    assert calls == [(("Salesforce/wikitext", "wikitext-2-raw-v1"), "test")]


def test_cli_oneshot_causal_lm_seqlen_calib_text_eval_windows_owl_block(tmp_path, conll_dir, capsys):
    """The LLM one-shot options: ``--seqlen`` (alias of ``--max-length``), calibration from a text file, capped
    perplexity windows, OWL per block with the LLaMA settings, no export."""
    import json

    from helpers import tiny_tokenizer

    from prune_trainer.cli import main
    from prune_trainer.oneshot.runner import OneShotConfig

    path = tmp_path / "llama"
    tiny_llama(6).save_pretrained(path)
    tok = tiny_tokenizer()
    tok.save_pretrained(path)
    text = tmp_path / "calib.txt"
    text.write_text(load_text("conll-validation", conll_dir), encoding="utf-8")
    out = tmp_path / "out"
    rc = main(["oneshot", "--model", str(path), "--task", "causal-lm", "--method", "wanda", "--sparsity", "0.6",
               "--seqlen", "16", "--calib-samples", "4", "--calib-batch-size", "2", "--calib-text", str(text),
               "--eval-windows", "2", "--owl", "--owl-scope", "block", "--owl-m", "5", "--owl-lambda", "0.08",
               "--no-export", "--data-dir", str(conll_dir), "--output-dir", str(out)])
    assert rc == 0 and not (out / "model").exists()
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["max_length"] == 16 and res["eval_windows"] == 2 and res["eval_tokens"] == 2 * 15
    assert res["owl"]["scope"] == "block" and res["owl"]["m"] == 5 and res["owl"]["lambda"] == 0.08
    ratios = res["owl"]["outlier_ratios"]
    for block in ("model.layers.0.", "model.layers.1."):  # one ratio per block, shared by its Linears
        assert len({v for k, v in ratios.items() if k.startswith(block)}) == 1
    assert all(0.52 - 1e-6 <= s <= 0.68 + 1e-6 for s in res["owl"]["layer_sparsity"].values())
    model = LlamaForCausalLM.from_pretrained(path).eval()
    ids = tokenize_text(load_text("conll-validation", conll_dir), tok)
    assert res["config"]["calib_text"] == str(text) and res["calib_tokens"] == 4 * 16
    assert perplexity(model, ids, 16, max_windows=2).n_tokens == res["eval_tokens"]
    for bad, match in ((dict(owl_scope="row"), "owl_scope"), (dict(eval_windows=0), "eval_windows")):
        with pytest.raises(ValueError, match=match):
            OneShotConfig(model=str(path), **bad).validate()
    capsys.readouterr()
