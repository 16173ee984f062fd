"""`MaskedLinear`: an `nn.Linear` that carries a binary weight mask (and optional trainable mask scores).

The effective weight is ``W ⊙ M``. The class keeps the parameter names of `nn.Linear` (``weight``,
``bias``) and adds a persistent buffer ``weight_mask``, so a wrapped model's checkpoints keep the
original keys plus one mask per layer, and `Trainer` checkpoints restore masks with the weights.

Invariant kept by the pruning callbacks: pruned entries of ``weight`` are exactly zero. The forward
therefore uses ``weight`` directly (no extra multiply per step) unless ``mask_in_forward`` is set,
which methods whose mask changes while the weights are kept rely on.

Trainable mask scores (``attach_scores``; movement pruning, Sanh et al. 2020 eq. 2–3): the forward is
``y = x (W ⊙ STE(S, M))ᵀ + b`` where the straight-through estimator passes ``∂L/∂M`` to the scores ``S``
unchanged, so every weight's score learns, pruned ones included (``∂L/∂S_ij = Σ_tokens (∂L/∂y_i) x_j W_ij``).

A ``weight_gate`` (a callable returning a tensor broadcastable to ``W``, e.g. one straight-through gate per row)
makes the forward ``y = x (W ⊙ gate())ᵀ + b``: group movement pruning gates whole rows or columns this way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


class StraightThroughMask(torch.autograd.Function):
    """Forward: the given 0/1 ``mask`` as the scores' dtype. Backward: ``∂L/∂S = ∂L/∂M`` (identity).

    The mask is computed from the scores outside the autograd graph (top-k or threshold), so one op covers
    hard and soft movement pruning (Sanh et al. 2020, eq. 3).
    """

    @staticmethod
    def forward(ctx, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return mask.to(scores.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return grad_output, None


def straight_through_mask(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mask`` (as a float tensor) whose gradient flows to ``scores`` unchanged."""
    return StraightThroughMask.apply(scores, mask)


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
        self.weight_gate: Callable[[], torch.Tensor] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, mask_in_forward: bool = False) -> MaskedLinear:
        """Wrap ``linear`` in place: the new module shares its ``weight`` and ``bias`` Parameters."""
        return cls._wrap(linear.weight, linear.bias, mask_in_forward)

    @classmethod
    def _wrap(cls, weight: nn.Parameter, bias: nn.Parameter | None, mask_in_forward: bool) -> MaskedLinear:
        """A module around an ``[out, in]`` ``weight`` Parameter and ``bias``, with an all-ones mask."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.out_features, new.in_features = weight.shape
        new.weight = weight
        new.bias = bias
        new.register_buffer("weight_mask", torch.ones_like(weight, dtype=torch.bool))
        new.mask_in_forward = mask_in_forward
        new.mask_scores = None
        new.weight_gate = None
        return new

    def to_linear(self) -> nn.Linear:
        """Return a plain `nn.Linear` with ``W ⊙ M`` baked into its weight (the inverse of `from_linear`)."""
        linear = nn.Linear(
            self.in_features, self.out_features, bias=self.bias is not None,
            device=self.weight.device, dtype=self.weight.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.weight.masked_fill(~self.weight_mask, 0))
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        linear.weight.requires_grad_(self.weight.requires_grad)
        return linear

    def unwrap(self) -> nn.Module:
        """The plain module this wraps, with ``W ⊙ M`` baked in (`to_linear`; `MaskedConv1D`: a `Conv1D`)."""
        return self.to_linear()

    @torch.no_grad()
    def set_mask(self, mask: torch.Tensor) -> None:
        """Replace the mask (shape ``[out, in]``, any dtype; non-zero = kept) and zero pruned weights."""
        if mask.shape != self.weight.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {tuple(self.weight.shape)}")
        self.weight_mask.copy_(mask.to(device=self.weight_mask.device) != 0)
        self.apply_mask()

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Zero the pruned weights in place: ``W ← where(M, W, 0)`` (exact zeros even where W is NaN or inf)."""
        self.weight.masked_fill_(~self.weight_mask, 0)

    @torch.no_grad()
    def mask_grad(self) -> None:
        """Zero the gradient of pruned weights in place: ``∇W ← where(M, ∇W, 0)`` (a NaN there cannot leak)."""
        if self.weight.grad is not None:
            self.weight.grad.masked_fill_(~self.weight_mask, 0)

    def effective_weight(self) -> torch.Tensor:
        """``where(M, W, 0)`` (differentiable w.r.t. ``W``; the gradient of pruned entries is 0)."""
        return self.weight.masked_fill(~self.weight_mask, 0)

    def attach_scores(self, init: float = 0.0, requires_grad: bool = True) -> nn.Parameter:
        """Create the score Parameter ``S`` (constant ``init``) if absent; the forward then uses ``STE(S, M)``."""
        if self.mask_scores is None:
            self.mask_scores = nn.Parameter(torch.full_like(self.weight, float(init)), requires_grad=requires_grad)
        return self.mask_scores

    @torch.no_grad()
    def freeze(self) -> None:
        """Bake the current mask in: zero the pruned weights and drop the scores."""
        self.apply_mask()
        self.mask_scores = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_gate is not None:
            weight = self.weight * self.weight_gate().to(self.weight.dtype)
        elif self.mask_scores is not None:
            weight = self.weight * straight_through_mask(self.mask_scores, self.weight_mask)
        elif self.mask_in_forward:
            weight = self.effective_weight()
        else:
            weight = self.weight
        return F.linear(x, weight, self.bias)

    def extra_repr(self) -> str:
        kept = int(self.weight_mask.sum())
        total = self.weight_mask.numel()
        return f"{super().extra_repr()}, sparsity={1 - kept / total:.4f}"


class MaskedConv1D(MaskedLinear):
    """GPT-2's `Conv1D` (``y = x W + b`` with ``W`` stored ``[in, out]``) as a `MaskedLinear`.

    In memory the weight is a ``[out, in]`` Parameter (``Wᵀ`` of the Conv1D; a copy made when wrapping, before the
    optimizer exists), so every callback and one-shot pruner sees the Linear layout and the forward is the same
    ``x Wᵀ``. The state dict keeps the Conv1D's own layout: ``weight``, ``weight_mask`` (and ``mask_scores``) are
    saved and loaded as ``[in, out]``, so checkpoints hold the keys and shapes of the unwrapped model, and
    `unwrap` gives a `Conv1D` back with ``W ⊙ M`` baked in.
    """

    _TRANSPOSED = ("weight", "weight_mask", "mask_scores")

    @classmethod
    def from_linear(cls, linear: nn.Module, mask_in_forward: bool = False) -> MaskedConv1D:  # type: ignore[override]
        """Wrap a `Conv1D` (weight ``[in, out]``): the bias Parameter is shared, the weight is re-laid out."""
        weight = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=linear.weight.requires_grad)
        return cls._wrap(weight, linear.bias, mask_in_forward)

    def unwrap(self) -> nn.Module:
        """A `Conv1D` (weight ``[in, out]``) holding ``(W ⊙ M)ᵀ`` and the bias."""
        from transformers.pytorch_utils import Conv1D

        conv = Conv1D(self.out_features, self.in_features).to(device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(self.effective_weight().t())
            if self.bias is not None:
                conv.bias.copy_(self.bias)
            else:
                conv.bias = None
        conv.weight.requires_grad_(self.weight.requires_grad)
        return conv

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in self._TRANSPOSED:
            if prefix + name in destination:
                value = destination[prefix + name]
                destination[prefix + name] = value.t() if keep_vars else value.detach().t().contiguous()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: object) -> None:
        for name in self._TRANSPOSED:
            value = state_dict.get(prefix + name)
            if value is not None and value.dim() == 2:
                state_dict[prefix + name] = value.t()
        super()._load_from_state_dict(state_dict, prefix, *args)
