"""OBS saliency scores and weight updates with a block-diagonal Fisher inverse (oBERT, Kurtic et al. 2022).

With the local quadratic model ``δL ≈ ½ δwᵀ F δw`` (OBS's second-order Taylor model, Hassibi & Stork 1993;
Kurtic et al. 2022, §3):

- score of weight i (the loss increase of pruning it alone, best compensation; OBS, Hassibi & Stork 1993):
  ``ρ_i = w_i² / (2 [F⁻¹]_ii)`` (Kurtic et al. 2022, eq. 5);
- joint update for a set Q of pruned weights in a block (OBS for several weights at once, Hassibi & Stork 1993):
  ``Δw = −F⁻¹_{:,Q} (F⁻¹_{QQ})⁻¹ w_Q`` — the exact minimiser of ``½ δwᵀ F δw`` s.t. ``(w + δw)_Q = 0``;
- the reference's summed single-weight form (oBERT eq. 6, SparseML): ``Δw = −F⁻¹ (w_Q / diag(F⁻¹)_Q)``,
  which equals the joint one only when ``F⁻¹_{QQ}`` is diagonal.

The joint solve is batched over blocks with a variable |Q| per block by solving
``(P F⁻¹ P + c(I − P)) z = P w`` (P = diag(1_Q)): its solution is ``z_Q = (F⁻¹_{QQ})⁻¹ w_Q``, ``z_R = 0``.
"""

from __future__ import annotations

import torch

from prune_trainer.methods.obert.fisher import BlockFisherInverse, batched_lapack_threads, from_blocks, to_blocks

UPDATE_MODES = ("joint", "summed", "none")


def obs_scores(weight: torch.Tensor, finv: BlockFisherInverse) -> torch.Tensor:
    """``ρ = w² / (2 diag(F⁻¹))`` with the shape of ``weight`` (float32)."""
    w = weight.detach().float().reshape(-1).to(finv.device)
    diag = finv.diag()
    return (w.square() / (2.0 * diag.clamp_min(torch.finfo(torch.float32).tiny))).view(weight.shape)


def joint_update_blocks(finv: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Batched ``Δw = −F⁻¹_{:,Q}(F⁻¹_{QQ})⁻¹ w_Q`` for blocks ``finv [s,B,B]``, weights ``w [s,B]``, Q ``q [s,B]``."""
    qf = q.to(finv.dtype)
    diag = finv.diagonal(dim1=1, dim2=2)
    # Scale of the identity on the free coordinates: the block's mean diagonal (keeps A well conditioned).
    c = diag.mean(1, keepdim=True).clamp_min(torch.finfo(finv.dtype).tiny)
    a = finv * qf.unsqueeze(2) * qf.unsqueeze(1) + torch.diag_embed((1.0 - qf) * c)
    z = torch.linalg.solve(a, (w * qf).unsqueeze(2))  # z_Q = (F⁻¹_QQ)⁻¹ w_Q, z_R = 0
    return -torch.bmm(finv, z).squeeze(2)


def summed_update_blocks(finv: torch.Tensor, w: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Sum of single-weight OBS updates: ``Δw = −F⁻¹ (w ⊙ 1_Q / diag(F⁻¹))``."""
    diag = finv.diagonal(dim1=1, dim2=2)
    v = w * q.to(w.dtype) / diag.clamp_min(torch.finfo(finv.dtype).tiny)
    return -torch.bmm(finv, v.unsqueeze(2)).squeeze(2)


@torch.no_grad()
def obs_update(
    weight: torch.Tensor,
    pruned: torch.Tensor,
    finv: BlockFisherInverse,
    mode: str = "joint",
    newly_pruned: torch.Tensor | None = None,
) -> torch.Tensor:
    """New weights after pruning ``pruned`` (bool, shape of ``weight``) with the OBS compensation.

    Only blocks that contain a ``newly_pruned`` weight (default: any pruned weight) are solved; the
    returned tensor (float32, shape of ``weight``) has every pruned entry exactly 0.
    """
    if mode not in UPDATE_MODES:
        raise ValueError(f"unknown OBS update mode {mode!r}; choose one of {UPDATE_MODES}")
    if pruned.shape != weight.shape:
        raise ValueError(f"pruned mask shape {tuple(pruned.shape)} != weight shape {tuple(weight.shape)}")
    B = finv.block_size
    w = to_blocks(weight.detach().to(finv.device, torch.float32).clone(), B)
    q = to_blocks(pruned.to(finv.device, torch.bool), B)
    new = q if newly_pruned is None else to_blocks(newly_pruned.to(finv.device, torch.bool), B)
    if mode != "none":
        active = new.any(1).nonzero().squeeze(1)
        for start in range(0, active.numel(), finv.chunk_blocks):
            idx = active[start : start + finv.chunk_blocks]
            fb = finv.blocks[idx].float()
            fb = fb.view(-1, 1, 1) if B == 1 else fb
            if mode == "joint":
                with batched_lapack_threads(finv.device):
                    dw = joint_update_blocks(fb, w[idx], q[idx])
            else:
                dw = summed_update_blocks(fb, w[idx], new[idx] & q[idx])
            w[idx] += dw
    w = w.masked_fill(q, 0.0)
    return from_blocks(w, weight.numel()).view(weight.shape)
