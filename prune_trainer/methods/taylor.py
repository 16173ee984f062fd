"""First-order Taylor importance (Molchanov, Mallya, Tyree, Frosio & Kautz 2019, "Importance Estimation for
Neural Network Pruning", eq. 3 and 8).

Removing weight ``w`` changes the loss by ``ΔL ≈ -g·w`` to first order (``g = ∂L/∂w``), so the importance
of a weight is ``I = |g·w|`` (``power=1``, the first-order criterion) or ``(g·w)²`` (``power=2``, eq. 8),
averaged over the mini-batches seen since the last pruning step (or an exponential moving average).
"""

from __future__ import annotations

import torch


def taylor_importance(weight: torch.Tensor, grad: torch.Tensor, power: int = 1) -> torch.Tensor:
    """``|g ⊙ w|^power`` per weight (float32, detached)."""
    return (grad.detach().float() * weight.detach().float()).abs().pow(power)


@torch.no_grad()
def accumulate(
    total: torch.Tensor, importance: torch.Tensor, count: int, ema: float | None = None
) -> torch.Tensor:
    """Fold one step's ``importance`` into ``total`` in place: running mean over ``count`` previous steps, or
    ``total ← ema · total + (1 - ema) · importance`` when ``ema`` is set (the first step initialises)."""
    if count == 0:
        return total.copy_(importance)
    if ema is None:
        return total.add_(importance.sub(total), alpha=1.0 / (count + 1))
    return total.mul_(ema).add_(importance, alpha=1.0 - ema)
