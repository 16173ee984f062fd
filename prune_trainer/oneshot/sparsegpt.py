"""SparseGPT (Frantar & Alistarh 2023, Alg. 1): column-by-column OBS-style pruning that shares one
``H⁻¹`` across rows, using the upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``): pruning or
keeping column ``j`` gives the error ``e = (w_j − q_j)/U_jj`` and updates the later columns by
``W[:, j:] −= e U[j, j:]``; updates are applied lazily per block of ``blocksize`` columns, and the mask
is chosen adaptively every ``mask_block`` columns from ``w²/U_jj²`` (flattened over the rows). In N:M mode
the mask of each group of M columns is chosen when its first column is reached, so the blocks are rounded up
to a multiple of M: no group straddles two blocks (the lazy updates of a block reach the next one only at its
end)."""

from __future__ import annotations

import torch

from prune_trainer.oneshot.base import LayerStats, check_pattern_args, check_weight, prepare_hessian


def _block_keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep all but the ``round(s·numel)`` lowest scores of the block (flattened over rows)."""
    flat = scores.reshape(-1)
    n_prune = int(round(sparsity * flat.numel()))
    mask = torch.ones_like(flat, dtype=torch.bool)
    if n_prune > 0:
        mask[torch.topk(flat, n_prune, largest=False).indices] = False
    return mask.view_as(scores)


def sparsegpt_prune(
    weight: torch.Tensor,
    stats: LayerStats,
    sparsity: float,
    prunen: int = 0,
    prunem: int = 0,
    blocksize: int = 128,
    mask_block: int = 64,
    percdamp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prune ``weight`` to ``sparsity`` (or N:M) minimising ``‖WX − ŴX‖²`` approximately; see module doc."""
    check_weight(weight)
    rows, cols = weight.shape
    check_pattern_args(sparsity, prunen, prunem, cols)
    if blocksize <= 0 or mask_block <= 0:
        raise ValueError(f"blocksize and mask_block must be positive, got {blocksize} and {mask_block}")
    if prunen:
        blocksize = -(-blocksize // prunem) * prunem  # groups of M never straddle two blocks
    H, W = prepare_hessian(stats.hessian(), weight, percdamp)
    Hinv = torch.cholesky_inverse(torch.linalg.cholesky(H))
    U = torch.linalg.cholesky(Hinv, upper=True)
    keep = torch.ones(rows, cols, dtype=torch.bool, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diagonal(U1)
        E1 = torch.zeros_like(W1)
        K1 = torch.ones_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            if prunen and i % prunem == 0:
                s = W1[:, i : i + prunem].square() / d1[i : i + prunem].square()
                idx = torch.topk(s, prunem - prunen, dim=1, largest=False).indices
                K1[:, i : i + prunem].scatter_(1, idx, False)
            elif not prunen and i % mask_block == 0:
                j2 = min(i + mask_block, i2 - i1)
                K1[:, i:j2] = _block_keep_mask(W1[:, i:j2].square() / d1[i:j2].square(), sparsity)
            w = W1[:, i]
            err = torch.where(K1[:, i], 0.0, w) / d1[i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i1:i2] = W1 * K1
        keep[:, i1:i2] = K1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return W.to(weight.dtype), keep
