"""Pruning with LoRA adapters (PEFT): masks live on the base weights, the adapters are never pruning targets, and
the merged model keeps the base model's zeros exactly.

A LoRA layer computes ``y = W x + s·B A x`` (Hu et al. 2022, eq. 3; ``s = α/r``). ``ΔW = s·B A`` is dense, so a
plain ``merge_and_unload`` (``W ← W + ΔW``) fills every pruned position. `merge_lora_keep_mask` merges and then
re-applies the base mask ``M``: ``W ← M ⊙ (W + ΔW) = W + M ⊙ ΔW`` (``W = M ⊙ W`` already), so the merged
model has exactly the base model's zeros and sparsity.

The merged model equals the adapter model only if the adapter never used the pruned positions: with
`mask_lora_updates` the LoRA forward computes ``W x + (M ⊙ s·B A) x`` during fine-tuning (the masked-adapter
scheme of sparsity-preserving adapters, e.g. SQFT, Muñoz et al. 2024), and the merge is then exact. Without it,
the merge drops ``(1 − M) ⊙ ΔW`` (how much that costs shows in the merged model's evaluation).

The base mask is the `MaskedLinear` mask when the base layer is one (callbacks), else the non-zero pattern of the
base weight (one-shot pruning bakes its zeros in).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from prune_trainer.masking.masked_linear import MaskedLinear


def _lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT LoRA layers of ``model`` by qualified name (``ImportError`` without peft)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError as err:
        raise ImportError("LoRA support needs the package peft: `pip install peft`") from err
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def lora_base_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Keep mask of the base weight of every LoRA layer: its `MaskedLinear` mask, else ``W != 0``."""
    masks = {}
    for name, layer in _lora_layers(model).items():
        base = layer.get_base_layer()
        masks[name] = base.weight_mask.bool() if isinstance(base, MaskedLinear) else base.weight != 0
    if not masks:
        raise ValueError(f"{type(model).__name__} has no LoRA layers (not a PEFT LoRA model)")
    return masks


@torch.no_grad()
def merge_lora_keep_mask(model: nn.Module) -> nn.Module:
    """``merge_and_unload`` of a PEFT LoRA model with every base weight's zeros kept (module doc):
    ``W ← M ⊙ (W + s·B A)``. Returns the merged base model."""
    layers = _lora_layers(model)
    masks = lora_base_masks(model)
    bases = {name: layer.get_base_layer() for name, layer in layers.items()}
    merged = model.merge_and_unload()
    for name, base in bases.items():
        base.weight.masked_fill_(~masks[name], 0.0)
    return merged


def _masked_lora_forward(self: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """``W x + Σ_adapters (M ⊙ s·B A) dropout(x)`` for a LoRA ``Linear`` (``self``) with a base mask."""
    result = self.base_layer(x, *args, **kwargs)
    if self.disable_adapters or self.merged:
        return result
    mask = self._prune_trainer_mask
    for name in self.active_adapters:
        if name not in self.lora_A:
            continue
        delta = self.lora_B[name].weight @ self.lora_A[name].weight * self.scaling[name]
        xd = self.lora_dropout[name](x).to(delta.dtype)
        result = result + F.linear(xd, delta * mask.to(delta.dtype)).to(result.dtype)
    return result


def mask_lora_updates(model: nn.Module) -> dict[str, torch.Tensor]:
    """Make every LoRA ``Linear`` of ``model`` compute ``W x + (M ⊙ s·B A) x`` with its base mask ``M``
    (`lora_base_masks`, taken now), so fine-tuning never uses pruned positions and `merge_lora_keep_mask`
    is exact. Costs one ``out × in`` product ``B A`` per layer and forward. Returns the masks."""
    from peft.tuners.lora import Linear as LoraLinear

    masks = lora_base_masks(model)
    for name, layer in _lora_layers(model).items():
        if not isinstance(layer, LoraLinear) or getattr(layer, "fan_in_fan_out", False):
            raise ValueError(f"{name}: masked LoRA updates support LoRA Linear layers over nn.Linear only")
        layer.register_buffer("_prune_trainer_mask", masks[name].clone(), persistent=False)
        layer.forward = types.MethodType(_masked_lora_forward, layer)
    return masks
