"""Rank-r factorization of the word embeddings."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from prune_trainer.factorization import (
    FactorizedEmbedding,
    factorize_word_embeddings,
    merge_word_embeddings,
)


def test_full_rank_reproduces_embedding_and_low_rank_is_the_svd_optimum():
    torch.manual_seed(0)
    emb = nn.Embedding(50, 16)
    full = FactorizedEmbedding.from_embedding(emb, 16)
    ids = torch.randint(0, 50, (3, 7))
    torch.testing.assert_close(full(ids), emb(ids), rtol=1e-5, atol=1e-5)
    low = FactorizedEmbedding.from_embedding(emb, 4)
    s = torch.linalg.svdvals(emb.weight.detach().double())
    err = float((low.weight.detach().double() - emb.weight.detach().double()).norm())
    assert err == pytest.approx(float(s[4:].square().sum().sqrt()), rel=1e-4)  # Eckart–Young
    assert torch.linalg.matrix_rank(low.weight.detach()) == 4


def test_factorize_model_trains_and_merges_back(model):
    model.eval()
    ids = torch.randint(5, 30, (2, 6))
    before = model(input_ids=ids).logits
    fact = factorize_word_embeddings(model, rank=32)  # hidden 32: exact
    assert isinstance(model.get_input_embeddings(), FactorizedEmbedding)
    assert fact.inner.weight.shape == (model.config.vocab_size, 32)
    torch.testing.assert_close(model(input_ids=ids).logits, before, rtol=1e-4, atol=1e-4)
    model.train()
    model(input_ids=ids, labels=torch.zeros_like(ids)).loss.backward()
    assert fact.inner.weight.grad is not None and fact.proj.weight.grad is not None
    model.eval()
    merged = merge_word_embeddings(model)
    assert type(merged) is nn.Embedding
    torch.testing.assert_close(merged.weight, fact.weight.detach())
    with pytest.raises(ValueError, match="not factorized"):
        merge_word_embeddings(model)


def test_rank_errors(model):
    with pytest.raises(ValueError, match="rank"):
        factorize_word_embeddings(model, rank=0)
    with pytest.raises(ValueError, match="rank"):
        factorize_word_embeddings(model, rank=1000)
