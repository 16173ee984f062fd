"""Importance scores and second-order updates for N:M masks (Trainer-independent math).

- magnitude: ``|W_ij|`` (NVIDIA ASP, Mishra et al. 2021 "Accelerating Sparse Deep Neural Networks").
- Wanda: ``|W_ij| · ‖X_j‖₂`` with ``X_j`` the j-th input feature over calibration tokens (Sun et al. 2023, eq. 1);
  within a group of M inputs of one output row this compares the weights' contributions to the output.
- movement: the layer's learned movement scores ``S`` (Sanh et al. 2020, §3), when a movement callback left them.
- second-order (oBERT, Kurtic et al. 2022, eq. 5–6 for a set Q of weights): for each group of
  M weights choose the M−N to prune that minimise ``½ w_Qᵀ ([F⁻¹]_QQ)⁻¹ w_Q``, with ``F`` the empirical Fisher
  of a block of B consecutive weights (B a multiple of M; the Fisher inverse and the joint update come from
  `prune_trainer.methods.obert`), then update each block's kept weights jointly:
  ``δw = −F⁻¹_{:,Q} ([F⁻¹]_QQ)⁻¹ w_Q``.
- SparseGPT's N:M mode (Frantar & Alistarh 2023, Alg. 1 with N:M selection): per layer, per group of M input
  columns, prune the M−N weights with the smallest ``w²/U_jj²`` (``U``: upper Cholesky factor of ``H⁻¹``,
  ``H = 2XXᵀ`` from calibration inputs), compensating the later columns; run by `prune_trainer.oneshot`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from prune_trainer.masking.masked_linear import MaskedLinear
from prune_trainer.masking.selection import check_nm

NM_SCORES = ("magnitude", "wanda", "movement", "obert", "sparsegpt")


def magnitude_nm_scores(layers: Mapping[str, MaskedLinear]) -> dict[str, torch.Tensor]:
    """``|W|`` per layer (detached)."""
    return {name: layer.weight.detach().abs() for name, layer in layers.items()}


def movement_nm_scores(layers: Mapping[str, MaskedLinear]) -> dict[str, torch.Tensor]:
    """The movement scores ``S`` stored on each layer (``layer.mask_scores``); error if a layer has none."""
    missing = [name for name, layer in layers.items() if getattr(layer, "mask_scores", None) is None]
    if missing:
        raise ValueError(
            f"score 'movement' needs movement scores on every layer (layer.mask_scores), missing on {missing[:3]}"
            f"{' ...' if len(missing) > 3 else ''}; run a movement-pruning callback first or choose one of "
            f"{[s for s in NM_SCORES if s != 'movement']}"
        )
    return {name: layer.mask_scores.detach().reshape(layer.weight.shape).float() for name, layer in layers.items()}


def wanda_nm_scores(
    layers: Mapping[str, MaskedLinear], input_norms: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``|W_ij| · ‖X_j‖₂`` (Wanda, Sun et al. 2023, eq. 1) from per-layer input-feature norms ``[in]``."""
    scores = {}
    for name, layer in layers.items():
        norm = input_norms.get(name)
        if norm is None or norm.shape != (layer.in_features,):
            got = None if norm is None else tuple(norm.shape)
            raise ValueError(f"input norm of layer {name} must have shape ({layer.in_features},), got {got}")
        scores[name] = layer.weight.detach().abs() * norm.to(layer.weight.device, torch.float32)[None, :]
    return scores


# ---- calibration data ------------------------------------------------------------------------------------


def calibration_batches(train_dataloader: Any, num_batches: int, batch_size: int | None = None, seed: int = 0):
    """Up to ``num_batches`` batches drawn (seeded) from the dataset and collator of ``train_dataloader``.

    A plain `DataLoader` over the same dataset is used so the Trainer's own (accelerate-wrapped) iterator and
    its RNG state are left alone.
    """
    if train_dataloader is None:
        raise ValueError("calibration needs the Trainer's train_dataloader (got None)")
    if num_batches < 1:
        raise ValueError(f"number of calibration batches must be ≥ 1, got {num_batches}")
    dataset = train_dataloader.dataset
    batch_size = batch_size or getattr(train_dataloader, "total_batch_size", None) or train_dataloader.batch_size or 8
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=True, generator=gen, collate_fn=train_dataloader.collate_fn
    )
    return itertools.islice(iter(loader), num_batches)


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def collect_input_norms(
    model: nn.Module, layers: Mapping[str, nn.Linear], batches: Iterable[Mapping[str, Any]]
) -> dict[str, torch.Tensor]:
    """``‖X_j‖₂`` of every input feature of every layer over the non-padding tokens of ``batches``.

    Forward hooks accumulate ``Σ_tokens x_j²``; tokens whose ``attention_mask`` is 0 are left out.
    """
    sq = {name: torch.zeros(layer.in_features, dtype=torch.float64) for name, layer in layers.items()}
    token_mask: list[torch.Tensor | None] = [None]

    def make_hook(name: str):
        def hook(_module, inputs, _output):
            x = inputs[0]
            mask = token_mask[0]
            if mask is not None and x.dim() == 3 and tuple(mask.shape) == tuple(x.shape[:2]):
                x = x[mask]
            sq[name] += x.reshape(-1, x.shape[-1]).double().pow(2).sum(0).cpu()

        return hook

    handles = [layer.register_forward_hook(make_hook(name)) for name, layer in layers.items()]
    device = next(model.parameters()).device
    seen = 0
    try:
        with _eval_mode(model):
            for batch in batches:
                batch = _to_device(batch, device)
                am = batch.get("attention_mask")
                token_mask[0] = am.bool() if am is not None else None
                model(**batch)
                seen += 1
    finally:
        for h in handles:
            h.remove()
    if seen == 0:
        raise ValueError("no calibration batch was given to collect input norms")
    return {name: s.sqrt().float() for name, s in sq.items()}


# ---- second order (oBERT-style N:M) ---------------------------------------------------------------------


def _prune_candidates(n: int, m: int, device: torch.device) -> torch.Tensor:
    """All index sets of size M−N within a group of M: ``[C(M, M−N), M−N]``."""
    return torch.tensor(list(itertools.combinations(range(m), m - n)), dtype=torch.long, device=device)


def obs_nm_select(weight: torch.Tensor, finv: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M keep-mask minimising, per group of M, the OBS loss ``½ w_Qᵀ ([F⁻¹]_QQ)⁻¹ w_Q`` of the pruned set Q.

    ``finv``: ``[out · in/B, B, B]`` inverse-Fisher blocks over rows of ``weight`` (``[out, in]``); each group's
    M×M diagonal sub-block is used (exhaustive search over the C(M, M−N) sets, vectorised).
    """
    out_f, in_f = weight.shape
    bsz = finv.shape[-1]
    check_nm(n, m, bsz)
    groups_per_block = bsz // m
    # [nb, G, M, M] diagonal sub-blocks of each group
    sub = finv.reshape(-1, groups_per_block, m, groups_per_block, m).diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2)
    sub = sub.reshape(-1, m, m)  # [num_groups, M, M]
    w = weight.detach().to(finv.dtype).reshape(-1, m)  # [num_groups, M]
    cand = _prune_candidates(n, m, weight.device)  # [C, k]
    w_q = w[:, cand]  # [g, C, k]
    sub_qq = sub[:, cand[:, :, None], cand[:, None, :]]  # [g, C, k, k]
    loss = 0.5 * (w_q * torch.linalg.solve(sub_qq, w_q.unsqueeze(-1)).squeeze(-1)).sum(-1)  # [g, C]
    best = cand[loss.argmin(-1)]  # [g, k]
    keep = torch.ones_like(w, dtype=torch.bool).scatter_(-1, best, False)
    return keep.reshape(out_f, in_f)


def obert_nm_masks(
    model: nn.Module,
    layers: Mapping[str, MaskedLinear],
    sampler: Any,
    num_grads: int,
    block_size: int,
    n: int,
    m: int,
    damp: float = 1e-7,
    update: bool = True,
) -> dict[str, torch.Tensor]:
    """Second-order N:M masks with oBERT's block Fisher inverse (``prune_trainer.methods.obert``).

    ``F⁻¹ = (λI + (1/m) Σ g gᵀ)⁻¹`` per block of ``block_size`` consecutive weights of a row, from ``num_grads``
    mini-batch gradients drawn by ``sampler`` (a `GradientSampler`); per group of M the pruned set is chosen by
    `obs_nm_select`, and with ``update`` the kept weights of each block get the joint OBS update
    ``δw = −F⁻¹_{:,Q} (F⁻¹_QQ)⁻¹ w_Q`` (`obs_update`, mode ``joint``). Returns the keep-masks.
    """
    from prune_trainer.methods.obert import BlockFisherInverse, obs_update

    check_nm(n, m, block_size)
    for name, layer in layers.items():  # blocks of B must not straddle rows
        if layer.in_features % block_size:
            raise ValueError(
                f"oBERT block_size {block_size} does not divide in_features={layer.in_features} of layer {name}"
            )
    world = getattr(sampler, "world_size", 1)
    m_local = -(-num_grads // world)
    finvs = {
        name: BlockFisherInverse(
            layer.weight.numel(), block_size, m_local * world, damp, "direct", device=layer.weight.device
        )
        for name, layer in layers.items()
    }
    params = [layer.weight for layer in layers.values()]
    for grads in sampler.sample(model, params, m_local):
        for finv, g in zip(finvs.values(), grads, strict=True):
            finv.add_grads(g)
    masks = {}
    for name, layer in layers.items():
        finv = finvs.pop(name)
        if world > 1:
            finv.all_reduce_()
        finv.finalize()
        keep = obs_nm_select(layer.weight, finv.matrix_blocks(), n, m)
        if update:
            with torch.no_grad():
                layer.weight.copy_(obs_update(layer.weight, ~keep, finv, "joint").to(layer.weight.dtype))
        masks[name] = keep
        del finv
    return masks


@torch.no_grad()
def sparsegpt_nm_masks(
    model: nn.Module,
    layers: Mapping[str, MaskedLinear],
    batches: Iterable[Mapping[str, Any]],
    n: int,
    m: int,
    targets: Iterable[str] | None,
    exclude: Iterable[str],
) -> dict[str, torch.Tensor]:
    """N:M masks and reconstructed weights from SparseGPT's N:M mode (`prune_trainer.oneshot.prune_sequential`,
    block by block over the encoder on calibration ``batches``); the weights are updated in place.

    Keep-masks are read back as ``W ≠ 0`` (a kept weight that is exactly 0 counts as pruned: still N:M).
    """
    from prune_trainer.oneshot.calibration import prune_sequential
    from prune_trainer.oneshot.registry import get_method

    device = next(model.parameters()).device
    batches = [_to_device({k: v for k, v in b.items() if k != "labels"}, device) for b in batches]
    if not batches:
        raise ValueError("no calibration batch was given to SparseGPT")
    with _eval_mode(model):
        prune_sequential(
            model, batches, get_method("sparsegpt"), 1.0 - n / m, prunen=n, prunem=m,
            targets=None if targets is None else tuple(targets), exclude=tuple(exclude), progress=False,
        )
    return {name: layer.weight.detach() != 0 for name, layer in layers.items()}
