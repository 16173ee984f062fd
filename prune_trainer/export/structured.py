"""Physical removal of pruned heads and FFN neurons: smaller Linears, saved and reloaded without pickle.

A group whose coupled weights are all zero contributes nothing to the layer's output (its output-side columns
are zero: ``o·(softmax(qkᵀ)v)`` and ``W₂·act(W₁x + b₁)`` lose exactly the terms of those columns), so slicing it
away gives the same function as the masked model. `export_structured_model` slices, records the per-layer sizes
in ``config.json`` (``prune_trainer_structure``) and saves safetensors atomically; `load_pruned_model` builds the
standard transformers class from the config, slices it to the recorded sizes and loads the weights.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file
from torch import nn
from transformers.initialization import no_init_weights

from prune_trainer.export.compressed import CompressionSpec, is_compressed_dir, read_compressed
from prune_trainer.export.export import canonicalize_zeros, encode_for_export, save_model_weights
from prune_trainer.export.sublayers import REMOVERS
from prune_trainer.io import atomic_dir
from prune_trainer.masking.inject import _set_submodule, unwrap_masked_layers
from prune_trainer.structures import ModelStructures, find_structures, kept_groups, kept_sizes

STRUCTURE_FIELD = "prune_trainer_structure"
"""The ``config.json`` field with the kept sizes per layer: ``{"heads": [query heads...], "ffn": [neurons...]}``
(0: that layer's attention / FFN sublayer is removed)."""


def _sliced_linear(linear: nn.Linear, index: torch.Tensor, axis: int) -> nn.Linear:
    """A new Linear keeping rows (``axis=0``, with their bias entries) or columns (``axis=1``) ``index``."""
    index = index.to(linear.weight.device)
    weight = linear.weight.detach().index_select(axis, index)
    out_f, in_f = weight.shape
    new = nn.Linear(in_f, out_f, bias=linear.bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if linear.bias is not None:
            new.bias.copy_(linear.bias.detach().index_select(0, index) if axis == 0 else linear.bias.detach())
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


@torch.no_grad()
def slice_model(model: nn.Module, structures: ModelStructures, keep: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    """Replace every coupled Linear by one holding only the kept groups' rows/columns, update the attention and
    FFN modules' size attributes, and return the kept sizes per layer (heads as query heads). In place.

    A layer that keeps no group of a kind loses that whole sublayer: it is replaced by the constant-output modules
    of `prune_trainer.export.sublayers` (its output Linear's bias, no attention / FFN computed).
    """
    sizes: dict[str, list[int]] = {}
    for kind, groups in structures.groups.items():
        mask = keep[kind].to("cpu", torch.bool)
        per_layer = kept_sizes(groups, mask)
        for lin in groups.linears:
            if per_layer[int(groups.group_layer[lin.group_ids[0]])] == 0:
                continue  # the whole sublayer goes below
            index = torch.nonzero(mask[lin.group_ids], as_tuple=True)[0]
            module = model.get_submodule(lin.name)
            if index.numel() != (module.out_features if lin.axis == 0 else module.in_features):
                _set_submodule(model, lin.name, _sliced_linear(module, index, lin.axis))
        if kind == "heads":
            per_layer = [n * structures.queries_per_group for n in per_layer]
        _set_size_attributes(model, structures, kind, per_layer)
        for layer, n in enumerate(per_layer):
            if n == 0:
                REMOVERS[kind](model, structures, layer)
        sizes[kind] = per_layer
    return sizes


def _set_size_attributes(model: nn.Module, structures: ModelStructures, kind: str, per_layer: list[int]) -> None:
    """Head counts / widths of each attention module, or the FFN width attribute, set to the kept sizes."""
    arch = structures.architecture
    modules = structures.groups[kind].layer_modules
    if kind == "heads":
        for prefix, heads in zip(modules, per_layer):
            attention = model.get_submodule(prefix)
            for attr in arch.head_count_attrs:
                setattr(attention, attr, heads)
            for attr in arch.head_width_attrs:
                setattr(attention, attr, heads * structures.head_dim)
    elif arch.ffn_size_attr:
        for prefix, neurons in zip(modules, per_layer):
            setattr(model.get_submodule(prefix), arch.ffn_size_attr, neurons)


def export_structured_model(
    model: nn.Module,
    path: str | os.PathLike,
    tokenizer: Any = None,
    format: str = "dense",
    quantize: str | None = None,
    embedding_rank: int | None = None,
) -> dict[str, list[int]]:
    """Slice the removed heads and FFN neurons out of ``model`` (in place: masks baked in, then smaller Linears),
    save it with ``config.json`` recording the kept sizes (``prune_trainer_structure``) and the tokenizer, into a
    folder that is complete or absent (`atomic_dir`). Returns the kept sizes ``{"heads": [...], "ffn": [...]}``.
    ``format``/``quantize``/``embedding_rank`` as in `export_pruned_model` (e.g. ``quantize="int8"``).

    A group is removed when all its coupled weights are zero. A layer with no group left of a kind loses that
    sublayer (recorded as size 0; `prune_trainer.export.sublayers`): the same function, without computing it.
    """
    spec = CompressionSpec(format=format, quantize=quantize, embedding_rank=embedding_rank)
    unwrap_masked_layers(model)
    canonicalize_zeros(model)
    structures = find_structures(model)
    keep = {}
    for kind, groups in structures.groups.items():
        weights = {lin.name: model.get_submodule(lin.name).weight for lin in groups.linears}
        keep[kind] = kept_groups(groups, weights).cpu()
    sizes = slice_model(model, structures, keep)
    uniform = _express_uniform(model.config, structures.head_dim, structures.queries_per_group, sizes)
    setattr(model.config, STRUCTURE_FIELD, {**sizes, "uniform": uniform})
    encoded = encode_for_export(model, spec)
    with atomic_dir(Path(path)) as tmp:
        save_model_weights(model, tmp, encoded)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return sizes


_HEAD_DIM_TYPES = frozenset({"llama", "qwen2", "mistral"})
"""Families whose config has an explicit ``head_dim`` (o_proj input = heads·head_dim, independent of hidden)."""


def _express_uniform(
    config: transformers.PretrainedConfig, head_dim: int, queries_per_group: int, sizes: dict[str, list[int]]
) -> bool:
    """When every layer keeps the same sizes and the config can state them, rewrite its size fields in place
    (so plain ``from_pretrained`` builds the sliced shapes) and return True; otherwise leave it and return False.

    Llama family: heads, KV heads (heads / queries per KV head), explicit ``head_dim``, ``intermediate_size``.
    BERT-like (head size = hidden/heads): only the FFN width, and only when every layer keeps all its heads.
    """
    heads, ffn = sizes.get("heads"), sizes.get("ffn")
    if (heads and len(set(heads)) != 1) or (ffn and len(set(ffn)) != 1) or 0 in (heads or []) + (ffn or []):
        return False  # removed sublayers need our modules: only load_pruned_model rebuilds them
    ffn_attr = "hidden_dim" if config.model_type == "distilbert" else "intermediate_size"
    if config.model_type in _HEAD_DIM_TYPES:
        updates: dict[str, int] = {}
        if heads:
            updates.update(
                num_attention_heads=heads[0], num_key_value_heads=heads[0] // queries_per_group, head_dim=head_dim
            )
    elif config.model_type in ("bert", "roberta", "distilbert"):
        n_heads = getattr(config, "num_attention_heads", getattr(config, "n_heads", None))
        if heads and heads[0] != n_heads:
            return False
        updates = {}
    else:
        return False
    if ffn:
        updates[ffn_attr] = ffn[0]
    for attr, value in updates.items():
        setattr(config, attr, value)
    return True


def _model_class(config: transformers.PretrainedConfig) -> type[transformers.PreTrainedModel]:
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise ValueError(
            f"config.architectures {names!r} names no transformers model class; pass model_class= explicitly"
        )
    return cls


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    if is_compressed_dir(path):
        return read_compressed(path)
    single = path / "model.safetensors"
    if single.is_file():
        return load_file(single)
    index = path / "model.safetensors.index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{path} holds no model.safetensors (or its index): only safetensors are loaded")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(path / shard))
    return state


def load_pruned_model(
    path: str | os.PathLike, model_class: type[transformers.PreTrainedModel] | None = None
) -> transformers.PreTrainedModel:
    """Load a folder written by `export_pruned_model` or `export_structured_model`, plain or compressed
    (``compression.json``: bitmask / N:M / INT8, decoded to float): the standard class of
    ``config.architectures`` (or ``model_class``) built from ``config.json``, sliced to the recorded sizes when the
    config has ``prune_trainer_structure``, then given the safetensors weights (no pickle, no code from the
    checkpoint), in the saved floating dtype. Returns the model in eval mode.

    Raises:
        ValueError: sizes that do not fit the model, weights that do not match the (sliced) modules, or a
            truncated/corrupt compressed file.
    """
    return _load_weights(build_pruned_model(path, model_class), Path(path))


def build_pruned_model(
    path: str | os.PathLike,
    model_class: type[transformers.PreTrainedModel] | None = None,
    init_weights: bool = False,
) -> transformers.PreTrainedModel:
    """The architecture of an export, without its weights: the class of ``config.architectures`` (or
    ``model_class``), sliced to the sizes recorded in ``config.json`` when it has ``prune_trainer_structure``
    (an unstructured export builds the plain class). ``init_weights=False`` leaves the tensors
    uninitialised (`load_pruned_model` overwrites them all); ``True`` gives the class's random init, e.g. to time
    the architecture (`prune_trainer.bench`). Reads only ``config.json``.

    Raises:
        ValueError: sizes that do not fit the model.
    """
    path = Path(path)
    config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=False)
    recorded = getattr(config, STRUCTURE_FIELD, None)
    cls = model_class or _model_class(config)
    init = contextlib.nullcontext() if init_weights else no_init_weights()
    with init:
        model = cls(config)
    if not isinstance(recorded, dict) or recorded.get("uniform"):  # unsliced, or the config states the kept sizes
        return model
    structures = find_structures(model, [k for k in ("heads", "ffn") if k in recorded])
    keep = {}
    for kind, groups in structures.groups.items():
        counts = [int(n) for n in recorded[kind]]
        if kind == "heads":
            rep = structures.queries_per_group
            if any(n % rep for n in counts):
                raise ValueError(f"{STRUCTURE_FIELD}.heads {counts}: not multiples of {rep} query heads per KV head")
            counts = [n // rep for n in counts]
        if len(counts) != len(groups.sizes) or any(not 0 <= n <= s for n, s in zip(counts, groups.sizes)):
            raise ValueError(
                f"{STRUCTURE_FIELD}.{kind} {recorded[kind]} does not fit the model's layers {groups.sizes}"
            )
        offsets = torch.tensor(groups.layer_offsets())
        rank = torch.arange(groups.num_groups) - offsets[groups.group_layer]
        keep[kind] = rank < torch.tensor(counts)[groups.group_layer]
    with no_init_weights():  # slicing copies kept rows of the (initialised or not) weights
        slice_model(model, structures, keep)
    return model


def _load_weights(model: transformers.PreTrainedModel, path: Path) -> transformers.PreTrainedModel:
    """Give ``model`` the folder's safetensors weights in their saved floating dtype; strict up to tied/non-
    persistent tensors. Returns the model in eval mode."""
    state = _read_weights(path)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # built under no_init_weights: make sure tied embeddings share their tensor
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtypes.pop())  # the saved precision (a bf16 export reloads as bf16)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{path}: weights for no module of the sliced model: {result.unexpected_keys[:5]}")
    tied = _tied_to_loaded(model, set(state))
    missing = [k for k in result.missing_keys if k not in tied]
    if missing:
        raise ValueError(f"{path}: no weights for {missing[:5]}")
    return model.eval()


def _tied_to_loaded(model: nn.Module, loaded: set[str]) -> set[str]:
    """Names of parameters and buffers that share their tensor with a loaded one (tied embeddings) or are not
    persistent (rotary tables, position ids)."""
    by_tensor: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(param), []).append(name)
    tied = {n for names in by_tensor.values() if loaded & set(names) for n in names}
    persistent = set(model.state_dict())
    return tied | {n for n, _ in model.named_buffers() if n not in persistent}
