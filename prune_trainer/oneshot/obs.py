"""Exact row-wise Optimal Brain Surgeon (Hassibi & Stork 1993; OBC, Frantar & Alistarh 2022, §3).

For each row ``w`` (its own ``H⁻¹`` since rows prune different inputs), repeat ``k`` times: prune
``q = argmin_j w_j² / [H⁻¹]_jj``, update ``w −= (w_q / [H⁻¹]_qq) H⁻¹[:, q]`` (exact least-squares
re-fit of the remaining weights) and downdate ``H⁻¹ −= H⁻¹[:, q] H⁻¹[q, :] / [H⁻¹]_qq``
(Schur complement: the inverse Hessian of the remaining inputs).

Vectorised over a chunk of rows as batched tensors. The rank-1 downdates of ``lazy`` consecutive
steps are kept as ``V`` (``H⁻¹_cur = H⁻¹_base − V Vᵀ``, ``v = H⁻¹[:, q]/√[H⁻¹]_qq``) so a step costs
``O(d·lazy)``; they are folded into ``H⁻¹_base`` with one batched GEMM per ``lazy`` steps, after which
every time a quarter of the current inputs is pruned, those are dropped (the matrices shrink).
Cost per layer: ``O(rows·d³)`` in the folds plus ``O(rows·d²·lazy)`` in the steps (timings:
``results/benchmarks/analyses/oneshot_layer_times.md``).
"""

from __future__ import annotations

import math

import torch

from prune_trainer.oneshot.base import LayerStats, check_pattern_args, check_weight, prepare_hessian


def _take_rows(mats: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``mats[b, pos[b], :]`` for a ``(B, r, c)`` batch and ``(B, r2)`` positions (one index_select)."""
    B, r, c = mats.shape
    flat = (pos + r * torch.arange(B, device=pos.device)[:, None]).reshape(-1)
    return mats.reshape(B * r, c).index_select(0, flat).view(B, pos.shape[1], c)


def _take_square(mats: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """``mats[b][pos[b]][:, pos[b]]``: whole rows first, then columns read along each row (cache-friendly)."""
    rows = _take_rows(mats, pos)
    B, n = pos.shape
    return torch.gather(rows, 2, pos[:, None, :].expand(B, n, n))


def _obs_rows(
    w: torch.Tensor, hinv: torch.Tensor, n_prune: int, prunen: int, prunem: int, lazy: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy OBS on a ``(B, d)`` chunk of rows sharing the initial ``(d, d)`` inverse Hessian."""
    B, d = w.shape
    dev = w.device
    w = w.clone()  # updated in place below
    idx = torch.arange(d, device=dev).expand(B, d).contiguous()  # original input index of each current position
    base = hinv.expand(B, d, d).contiguous()  # row-major copy per row (batched GEMM in place)
    gone = torch.zeros(B, d, dtype=torch.bool, device=dev)  # pruned positions not yet dropped from ``base``
    pruned = torch.zeros(B, d, dtype=torch.bool, device=dev)  # pruned, by original index
    group_count = torch.zeros(B, d // prunem, dtype=torch.long, device=dev) if prunen else None
    done = 0
    while done < n_prune:
        r = w.shape[1]
        row_start = r * torch.arange(B, device=dev)
        nb = min(lazy, n_prune - done)
        diag = torch.diagonal(base, dim1=1, dim2=2).clone()
        V = w.new_empty(B, nb, r)
        for t in range(nb):
            score = torch.div(w.square(), diag).masked_fill_(gone, math.inf)
            if prunen:
                score.masked_fill_(group_count.gather(1, idx // prunem) >= prunem - prunen, math.inf)
            q = score.argmin(1, keepdim=True)  # (B, 1)
            col = base.view(B * r, r).index_select(0, q.view(-1) + row_start)  # row q = column q (symmetric)
            if t:  # apply the t downdates not yet folded into ``base``: col −= Σ_i V_iq V_i
                coef = V[:, :t].gather(2, q[:, :, None].expand(B, t, 1)).transpose(1, 2)
                col = torch.baddbmm(col.unsqueeze(1), coef, V[:, :t], alpha=-1.0).squeeze(1)
            root = col.gather(1, q).sqrt_()  # √[H⁻¹]_qq
            v = torch.div(col, root, out=V[:, t])
            w.addcmul_(v, w.gather(1, q) / root, value=-1.0)  # w −= (w_q/[H⁻¹]_qq) H⁻¹[:, q]
            w.scatter_(1, q, 0.0)
            diag.addcmul_(v, v, value=-1.0)  # diag(H⁻¹ − vvᵀ)
            gone.scatter_(1, q, True)
            orig = idx.gather(1, q)
            pruned.scatter_(1, orig, True)
            if prunen:
                group_count.scatter_add_(1, orig // prunem, torch.ones_like(orig))
        base.baddbmm_(V.transpose(1, 2), V, alpha=-1.0)
        done += nb
        n_gone = int(gone[0].sum())
        if done < n_prune and n_gone >= r // 4:  # drop pruned positions (same count in every row)
            pos = torch.argsort(gone.to(torch.int8), dim=1, stable=True)[:, : r - n_gone]
            base = _take_square(base, pos)
            w, idx = w.gather(1, pos), idx.gather(1, pos)
            gone = torch.zeros_like(pos, dtype=torch.bool)
    out = torch.zeros(B, d, dtype=w.dtype, device=dev).scatter_(1, idx, w.masked_fill(gone, 0.0))
    return out, ~pruned


def obs_prune(
    weight: torch.Tensor,
    stats: LayerStats,
    sparsity: float,
    prunen: int = 0,
    prunem: int = 0,
    percdamp: float = 0.01,
    lazy: int = 32,
    chunk_bytes: int = 512 * 2**20,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact greedy row-wise OBS to ``sparsity`` per row (``round(s·in)`` pruned in every row), or N:M
    (``M−N`` pruned per group of ``M``). Rows are processed in chunks of ≈``chunk_bytes`` of ``H⁻¹``."""
    check_weight(weight)
    rows, cols = weight.shape
    check_pattern_args(sparsity, prunen, prunem, cols)
    if lazy <= 0:
        raise ValueError(f"lazy must be positive, got {lazy}")
    H, W = prepare_hessian(stats.hessian(dtype), weight, percdamp, dtype)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(H)).contiguous()  # LAPACK returns it column-major
    n_prune = cols // prunem * (prunem - prunen) if prunen else int(round(sparsity * cols))
    if n_prune == 0:
        return weight.clone(), torch.ones_like(weight, dtype=torch.bool)
    chunk = max(1, min(rows, chunk_bytes // (cols * cols * hinv.element_size() * 2)))
    out = torch.empty_like(W)
    keep = torch.empty(rows, cols, dtype=torch.bool, device=W.device)
    for r0 in range(0, rows, chunk):
        out[r0 : r0 + chunk], keep[r0 : r0 + chunk] = _obs_rows(W[r0 : r0 + chunk], hinv, n_prune, prunen, prunem, lazy)
    return out.to(weight.dtype), keep
