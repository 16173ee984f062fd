"""Shared pieces of the one-shot pruners: calibration statistics, input checks, Hessian preparation.

Every per-layer pruner is a pure function ``prune(W, stats, sparsity, prunen=0, prunem=0, **kw)``
returning ``(W_pruned, keep_mask)``; ``W`` is ``(out_features, in_features)`` and the layer computes
``W x``. The layer-wise objective (Frantar & Alistarh 2022, "Optimal Brain Compression"; SparseGPT, Frantar &
Alistarh 2023) is ``‖W X − Ŵ X‖²`` whose Hessian with respect to each row is ``H = 2 X Xᵀ``
(``X``: ``in_features × tokens``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prune_trainer.masking.selection import check_nm, check_sparsity


@dataclass
class LayerStats:
    """Calibration statistics of one Linear's inputs ``X`` (``in_features × n_tokens``).

    ``sq_norm[j] = Σ_t x_tj²`` (Wanda's ``‖X_j‖₂²``); ``xxt = Σ_t x_t x_tᵀ`` (only for Hessian-based
    methods, else None); ``n_tokens`` the number of calibration tokens seen.
    """

    sq_norm: torch.Tensor
    xxt: torch.Tensor | None
    n_tokens: int

    @classmethod
    def empty(cls, in_features: int, full: bool, device: torch.device | str | None = None) -> LayerStats:
        """Zero statistics on ``device`` (that of the inputs ``add`` will get; default CPU)."""
        xxt = torch.zeros(in_features, in_features, dtype=torch.float64, device=device) if full else None
        return cls(torch.zeros(in_features, dtype=torch.float64, device=device), xxt, 0)

    @classmethod
    def from_inputs(cls, x: torch.Tensor, full: bool = True) -> LayerStats:
        """Statistics of a ``(n_tokens, in_features)`` input matrix."""
        stats = cls.empty(x.shape[-1], full, x.device)
        stats.add(x)
        return stats

    def add(self, x: torch.Tensor) -> None:
        """Accumulate a ``(n_tokens, in_features)`` batch of inputs."""
        x = x.reshape(-1, x.shape[-1])
        x = x if x.dtype == torch.float64 else x.float()  # float32 matmul, float64 running sums
        self.sq_norm += x.square().sum(0).double()
        if self.xxt is not None:
            self.xxt += (x.T @ x).double()
        self.n_tokens += x.shape[0]

    def hessian(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``H = 2 X Xᵀ / n`` (SparseGPT's normalisation; the scale cancels in every method)."""
        if self.xxt is None:
            raise ValueError("these statistics were collected without X Xᵀ (full=False); Hessian methods need it")
        check_stats(self)
        return ((2.0 / self.n_tokens) * self.xxt).to(dtype)

    def col_norm(self) -> torch.Tensor:
        """Wanda's ``‖X_j‖₂`` per input feature (float32)."""
        check_stats(self)
        return self.sq_norm.sqrt().float()


def check_stats(stats: LayerStats) -> None:
    if stats.n_tokens <= 0:
        raise ValueError("empty calibration data: the layer saw 0 calibration tokens")


def check_weight(weight: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be a 2-D (out_features, in_features) matrix, got shape {tuple(weight.shape)}")


def check_pattern_args(sparsity: float, prunen: int, prunem: int, in_features: int) -> None:
    """``prunen``/``prunem`` both 0 (unstructured, checks ``sparsity``) or a valid N:M dividing the input."""
    if prunen == 0 and prunem == 0:
        check_sparsity(sparsity)
        return
    check_nm(prunen, prunem, in_features)


def prepare_hessian(
    hessian: torch.Tensor, weight: torch.Tensor, percdamp: float = 0.01, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dead inputs (``H_jj = 0``) get ``H_jj = 1`` and ``W[:, j] = 0``; add ``λI`` with
    ``λ = percdamp · mean(diag H)`` (SparseGPT, Frantar & Alistarh 2023, §4 / reference code).
    Returns ``dtype`` copies ``(H, W)`` on the weight's device."""
    if not 0 <= percdamp:
        raise ValueError(f"percdamp must be >= 0, got {percdamp}")
    if hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"Hessian shape {tuple(hessian.shape)} does not match weight shape {tuple(weight.shape)}")
    H = hessian.to(device=weight.device, dtype=dtype).clone()
    W = weight.to(dtype).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H.diagonal().add_(percdamp * torch.diagonal(H).mean())
    return H, W


def rowwise_keep_mask(scores: torch.Tensor, sparsity: float, prunen: int = 0, prunem: int = 0) -> torch.Tensor:
    """Keep mask pruning the ``round(s·in)`` lowest scores of every row, or the ``M−N`` lowest of every
    group of ``M`` consecutive inputs (N:M)."""
    rows, cols = scores.shape
    if prunen:
        groups = scores.reshape(rows, cols // prunem, prunem)
        idx = torch.topk(groups, prunen, dim=-1).indices
        return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True).reshape(rows, cols)
    k_keep = cols - int(round(sparsity * cols))
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k_keep > 0:
        mask.scatter_(1, torch.topk(scores, k_keep, dim=1).indices, True)
    return mask
