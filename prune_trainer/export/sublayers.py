"""Whole sublayers removed at export: the small modules that stand in for an attention or FFN with no group left.

A sublayer whose groups are all removed computes a constant: every output-side column (attention output dense /
FFN output Linear) is zero, so its output is that Linear's bias ``b`` (zero without a bias) at every position.
The layer around it is unchanged, so a post-norm layer (BERT family) computes ``LayerNorm(x + b)`` and a pre-norm
one (Llama family) adds ``b`` to the residual; dropping whole sublayers is CoFi's MHA/FFN masks (Xia, Zhong &
Chen 2022, §3.1). These modules compute exactly that without running the attention or the FFN:

- `BiasOnly` replaces the output Linear: ``y = b`` broadcast over the input's leading dimensions (it ignores the
  input's features, which may be zero-wide);
- `ZeroWidth` replaces an FFN input Linear: a ``[..., 0]`` view of its input (no matmul, the activation runs on
  nothing), so the FFN module's own forward still works;
- `RemovedAttention` replaces the attention module (``(output, None)`` like every supported attention): a
  `BiasOnly` when the output Linear lived inside it (Llama, DistilBERT, ModernBERT), else a zero-wide tensor for
  the outside output dense (BERT, DeBERTa). Under a key/value cache it appends one zero-wide-head entry per token,
  so the cache's sequence length stays right for generation.

None of these holds code or data from a checkpoint; their only tensors are the output biases (saved under the
names below in the safetensors file).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from prune_trainer.masking.inject import _set_submodule
from prune_trainer.structures import ModelStructures


class BiasOnly(nn.Module):
    """``y = b`` (``b`` = the removed Linear's bias, or zeros) of shape ``[*x.shape[:-1], out_features]``."""

    def __init__(self, out_features: int, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features = int(out_features)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (*x.shape[:-1], self.out_features)
        if self.bias is None:
            return x.new_zeros(shape)
        return self.bias.to(x.dtype).expand(shape)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, bias={self.bias is not None}"


class ZeroWidth(nn.Module):
    """``x[..., :0]``: the output of a Linear with no output feature left, without a zero-size Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., :0]


class RemovedAttention(nn.Module):
    """An attention sublayer with no head: returns ``(output(x), None)`` and never computes attention.

    ``output`` is a `BiasOnly` (the output Linear's bias at every position; zero-wide when the output dense sits
    outside the attention module and is itself replaced by a `BiasOnly`). ``layer_idx``: the attention's index in
    a key/value cache, if it had one.
    """

    def __init__(self, output: BiasOnly, layer_idx: int | None = None) -> None:
        super().__init__()
        self.output = output
        self.layer_idx = layer_idx

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, None]:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is not None and self.layer_idx is not None and hasattr(cache, "update"):
            empty = hidden_states.new_zeros(hidden_states.shape[0], 1, hidden_states.shape[1], 1)
            cache.update(empty, empty, self.layer_idx)  # one entry per token: the cache length stays right
        return self.output(hidden_states), None


def _output_inside(structures: ModelStructures) -> bool:
    arch = structures.architecture
    return arch.attention_out.startswith(arch.attention + ".")


def remove_attention(model: nn.Module, structures: ModelStructures, layer: int) -> None:
    """Replace layer ``layer``'s attention module (and its outside output dense) by `RemovedAttention`. In place."""
    arch = structures.architecture
    prefix = structures.layer_prefixes[layer]
    attention = model.get_submodule(f"{prefix}.{arch.attention}")
    out = model.get_submodule(f"{prefix}.{arch.attention_out}")
    bias = out.bias if isinstance(out, nn.Linear) else getattr(out, "bias", None)
    out_features = out.out_features
    layer_idx = getattr(attention, "layer_idx", None)
    if _output_inside(structures):
        _set_submodule(model, f"{prefix}.{arch.attention}", RemovedAttention(BiasOnly(out_features, bias), layer_idx))
        return
    _set_submodule(model, f"{prefix}.{arch.attention}", RemovedAttention(BiasOnly(0, None), layer_idx))
    _set_submodule(model, f"{prefix}.{arch.attention_out}", BiasOnly(out_features, bias))


def remove_ffn(model: nn.Module, structures: ModelStructures, layer: int) -> None:
    """Replace layer ``layer``'s FFN input Linears by `ZeroWidth` and its output Linear by `BiasOnly`. In place."""
    arch = structures.architecture
    prefix = structures.layer_prefixes[layer]
    for name in arch.ffn_in:
        _set_submodule(model, f"{prefix}.{name}", ZeroWidth())
    out = model.get_submodule(f"{prefix}.{arch.ffn_out}")
    _set_submodule(model, f"{prefix}.{arch.ffn_out}", BiasOnly(out.out_features, out.bias))


def linear_weight_count(model: nn.Module, name: str) -> int:
    """Weights of the Linear ``name`` in an export: 0 where its sublayer was removed (the module is gone or is one
    of the constant-output modules above)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return 0
    weight = getattr(module, "weight", None)
    return int(weight.numel()) if isinstance(weight, torch.Tensor) else 0


REMOVERS = {"heads": remove_attention, "ffn": remove_ffn}
"""Structure kind → the function that removes that sublayer of one layer."""
