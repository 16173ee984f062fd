"""Transformer blocks for sequential calibration: find the block stacks, capture each block's own arguments, re-run
one block at a time.

Each block is re-run with the arguments the model itself gave *that* block in a plain forward pass (masks, position
ids, rotary ``position_embeddings``, T5's ``position_bias``, sliding-window masks that differ per layer), captured by
forward pre-hooks, with every cache argument replaced by None and ``use_cache=False``: no KV cache is carried from
one replay to the next. Only the hidden state is replaced, by the previous block's (pruned or dense) output.
Hidden states and arguments are kept on the CPU and moved to the model's device one batch at a time, so the device
holds one block's activations for one batch. An encoder-decoder has two stacks (T5: ``encoder.block``, then
``decoder.block``); the decoder's arguments (``encoder_hidden_states`` included) are captured from a forward pass of
the model whose encoder is already pruned.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from prune_trainer.families import family_of, prunable_module_types

CACHE_ARGUMENTS = frozenset({"cache", "past_key_values", "past_key_value", "layer_past"})
"""Block arguments that carry a KV cache: always None when a block is re-run."""


@dataclass
class StackInputs:
    """What a block stack's calibration needs, per batch: the current block input ``hidden`` (CPU), each block's
    own arguments ``kwargs[block][batch]`` (CPU, hidden state and caches removed), the ``(batch, seq)`` mask of real
    tokens and, for a decoder stack, the encoder's token mask (for inputs that are the encoder's states)."""

    hidden: list[torch.Tensor] = field(default_factory=list)
    kwargs: list[list[dict[str, Any]]] = field(default_factory=list)
    token_masks: list[torch.Tensor] = field(default_factory=list)
    encoder_masks: list[torch.Tensor | None] = field(default_factory=list)


class _StopForward(Exception):
    pass


def block_stacks(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The model's block lists in forward order: the family's (`MODEL_FAMILIES`), else every ``nn.ModuleList`` that
    holds Linear layers and is not inside another one. ValueError when there is none."""
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) > 0]
    family = family_of(model)
    if family is not None:
        found = []
        for suffix in family.blocks:
            match = [(n, m) for n, m in lists if n == suffix or n.endswith("." + suffix)]
            if not match:
                raise ValueError(f"{type(model).__name__} ({family.name}) has no block list named like {suffix!r}")
            found.append(match[0])
        return found
    kinds = prunable_module_types()
    with_linears = [(n, m) for n, m in lists if any(isinstance(x, kinds) for x in m.modules())]
    outer = [(n, m) for n, m in with_linears if not any(n.startswith(o + ".") for o, _ in with_linears)]
    if not outer:
        raise ValueError(f"{type(model).__name__} has no list of transformer blocks (no nn.ModuleList of Linears)")
    return outer


def _shift_right(ids: torch.Tensor, start: int) -> torch.Tensor:
    return torch.cat([torch.full_like(ids[:, :1], start), ids[:, :-1]], dim=1)


def model_inputs(model: nn.Module, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The batch on ``device`` (without keys the model's forward does not take, e.g. a BERT tokenizer's
    ``token_type_ids`` for OPT); an encoder-decoder without decoder inputs gets ``decoder_input_ids`` = the inputs
    shifted right behind ``decoder_start_token_id`` (and the attention mask shifted alike)."""
    params = inspect.signature(model.forward).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    inputs = {k: v.to(device) for k, v in batch.items() if takes_any or k in params}
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False) and not {"decoder_input_ids", "labels"} & set(inputs):
        start = getattr(config, "decoder_start_token_id", None)
        start = start if start is not None else getattr(config, "pad_token_id", None)
        if start is None:
            raise ValueError("encoder-decoder calibration needs decoder_input_ids or config.decoder_start_token_id")
        inputs["decoder_input_ids"] = _shift_right(inputs["input_ids"], start)
        if "attention_mask" in inputs:
            inputs["decoder_attention_mask"] = _shift_right(inputs["attention_mask"], 1)
    return inputs


def _token_masks(model: nn.Module, inputs: dict[str, torch.Tensor], stack: int) -> tuple[torch.Tensor, Any]:
    """``(token mask of the stack's inputs, encoder token mask or None)``; stacks after the first of an
    encoder-decoder are decoder stacks."""
    def mask(ids_key: str, mask_key: str) -> torch.Tensor:
        if mask_key in inputs:
            return inputs[mask_key].bool()
        ids = inputs.get(ids_key, inputs.get("labels" if ids_key.startswith("decoder") else "inputs_embeds"))
        return torch.ones(ids.shape[:2], dtype=torch.bool, device=ids.device)

    encoder = mask("input_ids", "attention_mask")
    if stack > 0 and getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        return mask("decoder_input_ids", "decoder_attention_mask"), encoder
    return encoder, None


def named_arguments(block: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(name of the hidden-state argument, all arguments by name)`` of a call ``block(*args, **kwargs)``, with
    caches set to None and ``use_cache`` to False."""
    sig = inspect.signature(block.forward)
    bound = sig.bind_partial(*args, **kwargs)
    named: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise ValueError(f"{type(block).__name__} takes extra positional arguments; cannot replay it")
        else:
            named[name] = value
    for name in CACHE_ARGUMENTS & set(named):
        named[name] = None
    if "use_cache" in named:
        named["use_cache"] = False
    return next(iter(sig.parameters)), named


def move(value: Any, device: torch.device | str, memo: dict[int, tuple[Any, Any]] | None = None) -> Any:
    """``value`` with every tensor inside (tuples, lists, dicts) moved to ``device``; ``memo`` (by ``id``) makes a
    tensor shared by several blocks one copy."""
    if isinstance(value, torch.Tensor):
        if memo is None:
            return value.to(device)
        if id(value) not in memo:
            memo[id(value)] = (value, value.to(device))
        return memo[id(value)][1]
    if isinstance(value, (tuple, list)):
        return type(value)(move(v, device, memo) for v in value)
    if isinstance(value, dict):
        return {k: move(v, device, memo) for k, v in value.items()}
    return value


@torch.no_grad()
def capture_stack_inputs(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], stacks: list[int]
) -> dict[int, StackInputs]:
    """Run the model on each batch (no cache) and record, for the given stack indices, the first block's hidden
    input and every block's own arguments (CPU); the forward stops after the last block's arguments are seen."""
    all_stacks = block_stacks(model)
    device = next(model.parameters()).device
    out = {s: StackInputs(kwargs=[[] for _ in all_stacks[s][1]]) for s in stacks}
    last = (max(stacks), len(all_stacks[max(stacks)][1]) - 1)
    memo: dict[int, tuple[Any, Any]] = {}

    def make_hook(s: int, i: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden_name, named = named_arguments(module, args, kwargs)
            hidden = named.pop(hidden_name)
            if i == 0:
                out[s].hidden.append(hidden.detach().to("cpu"))
            out[s].kwargs[i].append(move(named, "cpu", memo))
            if (s, i) == last:
                raise _StopForward

        return hook

    handles = [all_stacks[s][1][i].register_forward_pre_hook(make_hook(s, i), with_kwargs=True)
               for s in stacks for i in range(len(all_stacks[s][1]))]
    use_cache = getattr(getattr(model, "config", None), "use_cache", None)
    try:
        if use_cache is not None:
            model.config.use_cache = False
        for batch in batches:
            memo.clear()
            inputs = model_inputs(model, batch, device)
            try:
                model(**inputs)
            except _StopForward:
                pass
            for s in stacks:
                token_mask, encoder_mask = _token_masks(model, inputs, s)
                out[s].token_masks.append(token_mask.to("cpu"))
                out[s].encoder_masks.append(None if encoder_mask is None else encoder_mask.to("cpu"))
    finally:
        for h in handles:
            h.remove()
        if use_cache is not None:
            model.config.use_cache = use_cache
    memo.clear()
    return out


def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict[str, Any], device: torch.device) -> torch.Tensor:
    """One block on one batch (its own captured arguments, the given hidden state); the output hidden state on
    the CPU."""
    hidden_name = next(iter(inspect.signature(block.forward).parameters))
    out = block(**{hidden_name: hidden.to(device)}, **move(kwargs, device))
    out = out if isinstance(out, torch.Tensor) else out[0]
    return out.to("cpu")


def token_rows(x: torch.Tensor, token_mask: torch.Tensor, encoder: torch.Tensor | None = None,
               encoder_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The rows of a Linear's input ``x`` that belong to real tokens, as ``(n, in_features)``.

    ``x`` laid out ``(batch, seq, …)`` or flattened ``(batch·seq, …)`` is masked by ``token_mask`` (by
    ``encoder_mask`` when ``x`` is the ``encoder`` states themselves, as T5's cross-attention keys and values);
    any other layout (inputs already unpadded, or not one row per token) gives every row.
    """
    mask = encoder_mask if encoder is not None and x is encoder else token_mask
    if x.shape[:-1] == mask.shape:
        return x[mask]
    flat = x.reshape(-1, x.shape[-1])
    if flat.shape[0] == mask.numel():
        return flat[mask.reshape(-1)]
    return flat
