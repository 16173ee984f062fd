"""Low-rank word embeddings: BERT's word embeddings replaced by rank-r SVD factors before fine-tuning (as
ALBERT's factorized embedding parameterization, Lan et al. 2020; e.g. r = 64).

``E ≈ A B`` with ``A = U_r Σ_r`` (``vocab × r``) and ``B = V_rᵀ`` (``r × hidden``) from the truncated
SVD ``E = U Σ Vᵀ`` — the best rank-``r`` approximation in Frobenius norm (Eckart–Young).
"""

from __future__ import annotations

import torch
from torch import nn


class FactorizedEmbedding(nn.Module):
    """``Embedding(vocab, r)`` followed by ``Linear(r, hidden, bias=False)``: ``e(i) = A[i] B``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, rank: int, padding_idx: int | None = None):
        super().__init__()
        if not 0 < rank <= min(num_embeddings, embedding_dim):
            raise ValueError(f"rank must be in [1, {min(num_embeddings, embedding_dim)}], got {rank}")
        self.num_embeddings, self.embedding_dim, self.rank = num_embeddings, embedding_dim, rank
        self.padding_idx = padding_idx
        self.inner = nn.Embedding(num_embeddings, rank, padding_idx=padding_idx)
        self.proj = nn.Linear(rank, embedding_dim, bias=False)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, rank: int) -> FactorizedEmbedding:
        """Truncated SVD of ``embedding.weight`` (computed in float64)."""
        vocab, dim = embedding.weight.shape
        module = cls(vocab, dim, rank, embedding.padding_idx)
        U, S, Vh = torch.linalg.svd(embedding.weight.detach().double(), full_matrices=False)
        dtype = embedding.weight.dtype
        with torch.no_grad():
            module.inner.weight.copy_((U[:, :rank] * S[:rank]).to(dtype))
            module.proj.weight.copy_(Vh[:rank].T.to(dtype))
        return module.to(embedding.weight.device)

    @property
    def weight(self) -> torch.Tensor:
        """The full ``vocab × hidden`` matrix ``A B`` (for code that reads ``.weight``)."""
        return self.inner.weight @ self.proj.weight.T

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.proj(self.inner(input_ids))

    def to_embedding(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` holding ``A B`` (rank ≤ r) — for saving a standard checkpoint."""
        emb = nn.Embedding(self.num_embeddings, self.embedding_dim, padding_idx=self.padding_idx)
        with torch.no_grad():
            emb.weight.copy_(self.weight)
        return emb.to(self.inner.weight.device)


def factorize_word_embeddings(model: nn.Module, rank: int = 64) -> FactorizedEmbedding:
    """Replace the model's input (word) embeddings by a rank-``rank`` `FactorizedEmbedding`, in place."""
    emb = model.get_input_embeddings()
    if isinstance(emb, FactorizedEmbedding):
        raise ValueError("the word embeddings are already factorized")
    if not isinstance(emb, nn.Embedding):
        raise ValueError(f"input embeddings must be nn.Embedding, got {type(emb).__name__}")
    factorized = FactorizedEmbedding.from_embedding(emb, rank)
    model.set_input_embeddings(factorized)
    return factorized


def merge_word_embeddings(model: nn.Module) -> nn.Embedding:
    """Undo the module swap: put back a plain ``nn.Embedding`` with the product ``A B`` (in place)."""
    emb = model.get_input_embeddings()
    if not isinstance(emb, FactorizedEmbedding):
        raise ValueError(f"the word embeddings are not factorized ({type(emb).__name__})")
    plain = emb.to_embedding()
    model.set_input_embeddings(plain)
    return plain
