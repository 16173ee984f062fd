"""`MaskedLinear`: an `nn.Linear` that carries a binary weight mask (and optional per-weight scores).

The effective weight is ``W ⊙ M``. The class keeps the parameter names of `nn.Linear` (``weight``,
``bias``) and adds a persistent buffer ``weight_mask``, so a wrapped model's checkpoints keep the
original keys plus one mask per layer, and `Trainer` checkpoints restore masks with the weights.

Invariant kept by the pruning callbacks: pruned entries of ``weight`` are exactly zero. The forward
therefore uses ``weight`` directly (no extra multiply per step) unless ``mask_in_forward`` is set,
which methods whose mask is a function of trainable scores (movement pruning) rely on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MaskedLinear(nn.Linear):
    """Linear layer ``y = x (W ⊙ M)ᵀ + b`` with a persistent 0/1 mask buffer ``weight_mask``.

    Args:
        in_features, out_features, bias, device, dtype: as for `nn.Linear`.
        mask_in_forward: multiply by the mask in every forward (off by default: pruned weights are
            kept at exactly zero by the callbacks, so the product is not needed).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        mask_in_forward: bool = False,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer(
            "weight_mask", torch.ones(out_features, in_features, dtype=torch.bool, device=self.weight.device)
        )
        self.mask_in_forward = mask_in_forward
        self.mask_scores: nn.Parameter | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask_in_forward: bool = False) -> MaskedLinear:
        """Wrap ``linear`` in place: the new module shares its ``weight`` and ``bias`` Parameters."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features = linear.in_features
        new.out_features = linear.out_features
        new.weight = linear.weight
        new.bias = linear.bias
        new.register_buffer("weight_mask", torch.ones_like(linear.weight, dtype=torch.bool))
        new.mask_in_forward = mask_in_forward
        new.mask_scores = None
        return new

    def to_linear(self) -> nn.Linear:
        """Return a plain `nn.Linear` with ``W ⊙ M`` baked into its weight (the inverse of `from_linear`)."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None,
            device=self.weight.device, dtype=self.weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.weight * self.weight_mask.to(self.weight.dtype))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.weight.requires_grad_(self.weight.requires_grad)
        return linear

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask (shape ``[out, in]``, any dtype; non-zero = kept) and zero pruned weights."""
        if mask.shape != self.weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(self.weight.shape)}")
        self.weight_mask.copy_(mask.to(device=self.weight_mask.device) != 0)
        self.apply_mask()

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zero the pruned weights in place: ``W ← W ⊙ M``."""
        self.weight.mul_(self.weight_mask.to(self.weight.dtype))

    @torch.no_grad()
    def mask_grad(self) -> None:
        """Zero the gradient of pruned weights in place: ``∇W ← ∇W ⊙ M``."""
        if self.weight.grad is not None:
            self.weight.grad.mul_(self.weight_mask.to(self.weight.grad.dtype))

    def effective_weight(self) -> torch.Tensor:
        """``W ⊙ M`` (differentiable w.r.t. ``W``)."""
        return self.weight * self.weight_mask.to(self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.effective_weight() if self.mask_in_forward else self.weight
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        kept = int(self.weight_mask.sum())
        total = self.weight_mask.numel()
        return f"{super().extra_repr()}, sparsity={1 - kept / total:.4f}"
