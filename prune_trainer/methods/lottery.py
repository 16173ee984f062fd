"""Lottery tickets: iterative magnitude pruning (IMP) with rewinding, and the controls it is compared with.

IMP (Frankle & Carbin 2019, §2 "Identifying winning tickets"): train, prune ``p`` of the *remaining* weights with the
smallest ``|W|``, reset the survivors to the rewind point ``θ_k`` (the pre-trained weights for BERT, Chen et al.
2020; or the weights after ``k`` steps, "late resetting", Frankle et al. 2019/2020), train again with the mask
fixed. After ``r`` rounds the sparsity is ``s_r = 1 − (1 − p)^r``.

Controls: the same mask from a random re-initialisation (Frankle & Carbin 2019, §2 "random reinit"), and a
random mask with the same per-layer sparsity (Chen et al. 2020, "random pruning"). Tensors in, tensors out.
"""

from __future__ import annotations

import torch

from prune_trainer.masking.selection import select_masks


def compounded_sparsity(rate: float, rounds: int) -> float:
    """``s_r = 1 − (1 − p)^r``: the sparsity after ``r`` rounds that each prune ``p`` of the remaining weights."""
    if not 0.0 < rate < 1.0:
        raise ValueError(f"rate must be in (0, 1), got {rate!r}")
    if rounds < 0:
        raise ValueError(f"rounds must be non-negative, got {rounds!r}")
    return 1.0 - (1.0 - rate) ** rounds


def imp_masks(
    weights: dict[str, torch.Tensor], masks: dict[str, torch.Tensor], sparsity: float, scope: str = "global"
) -> dict[str, torch.Tensor]:
    """The next IMP masks: of the weights kept by ``masks``, keep the largest ``|W|`` for total ``sparsity``.

    Pruned weights score ``−inf`` and the kept count never grows (``sparsity`` is at least the current one), so
    the new masks are subsets of ``masks`` (nested); ``scope`` is ``global`` (one threshold) or ``layer``. A
    check raises if a new mask revives a pruned weight (e.g. a sparsity below the current one)."""
    scores = {n: w.detach().float().abs().masked_fill(~masks[n].bool(), float("-inf")) for n, w in weights.items()}
    new = select_masks(scores, sparsity, scope, "unstructured", min_kept_fraction=0.0)
    revived = [n for n in new if bool((new[n] & ~masks[n].bool()).any())]
    if revived:
        raise ValueError(f"sparsity {sparsity} would revive pruned weights in {revived[:3]}: it is below the masks'")
    return new


def random_masks_like(masks: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Uniformly random masks keeping exactly as many weights per layer as ``masks`` (the random-pruning
    control: same per-layer sparsity, positions drawn independently of the weights)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, mask in masks.items():
        kept = int(mask.bool().sum())
        flat = torch.zeros(mask.numel(), dtype=torch.bool)
        flat[torch.randperm(mask.numel(), generator=gen)[:kept]] = True
        out[name] = flat.view(mask.shape)
    return out


def reinit_linears(
    state: dict[str, torch.Tensor], layers: list[str], std: float, seed: int
) -> dict[str, torch.Tensor]:
    """A copy of ``state`` with each listed Linear redrawn as BERT initialises it (``W ~ N(0, std²)``,
    ``std = initializer_range``; bias 0; Devlin et al. 2019 / HF ``BertPreTrainedModel._init_weights``): the
    random-reinit control. Every other tensor is unchanged."""
    gen = torch.Generator().manual_seed(seed)
    out = dict(state)
    for name in layers:
        weight = state[f"{name}.weight"]
        out[f"{name}.weight"] = (torch.randn(weight.shape, generator=gen) * std).to(weight.dtype)
        if f"{name}.bias" in state:
            out[f"{name}.bias"] = torch.zeros_like(state[f"{name}.bias"])
    return out
