"""Coupled weight groups of transformer models: attention heads and FFN neurons, found from the model.

Removing a structure means removing every weight it touches, in all the Linears it couples (Michel, Levy &
Neubig 2019 for heads; the FFN neuron is a row of the first and a column of the second FFN matrix):

- BERT family: head ``h`` of a layer = rows ``[h·d, (h+1)·d)`` of the query/key/value weights and biases and
  columns ``[h·d, (h+1)·d)`` of the attention output dense (``d`` = head size);
- Llama family (grouped-query attention): KV head ``g`` = its rows of k/v and the rows of its
  ``r = num_attention_heads / num_key_value_heads`` query heads in q, with their columns of o;
- FFN neuron ``i`` = row ``i`` (and bias ``i``) of each input Linear (intermediate dense; gate_proj and up_proj)
  and column ``i`` of the output Linear;
- fused Linears (ModernBERT's ``Wqkv`` = ``[q | k | v]`` and GLU ``Wi`` = ``[input | gate]``) are one coupled
  Linear whose group ids repeat per part; DeBERTa-v2's relative-position projections (``pos_key_proj``,
  ``pos_query_proj``) are per-head rows too and go with their head.

Groups are vectorised: each coupled Linear carries a tensor of *global* group ids, one per row (``axis=0``) or per
column (``axis=1``), so a per-group reduction is one ``index_add_`` per Linear and a group mask becomes an element
mask by one gather (``keep[group_ids]``). The only table of architectures is `ARCHITECTURES`, keyed by
``config.model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

StructureKind = Literal["heads", "ffn"]
STRUCTURE_KINDS: tuple[str, ...] = ("heads", "ffn")


@dataclass(frozen=True)
class Architecture:
    """Where the coupled Linears of one model family live (module names relative to a transformer layer).

    ``layers``: suffix of the ``nn.ModuleList`` of layers; ``attention``: the attention module (its head size is
    ``head_size_attr``; ``head_count_attrs`` / ``head_width_attrs`` are its per-layer head count / ``count·d``
    attributes, updated when heads are sliced away); ``grouped_kv``: heads are grouped-query KV groups.
    ``fused_qkv``: one Linear with rows ``[q | k | v]`` (each ``H·d`` wide, heads contiguous inside each) instead
    of ``query``/``key``/``value``; ``head_rows``: further per-head row-grouped Linears, coupled where the layer
    has them (DeBERTa's relative-position projections); ``fused_glu``: ``ffn_in`` is one Linear with rows
    ``[input | gate]``, each ``intermediate`` wide (neuron ``i`` owns rows ``i`` and ``n + i``).
    """

    layers: str
    attention: str
    attention_out: str
    ffn_in: tuple[str, ...]
    ffn_out: str
    head_size_attr: str
    query: str = ""
    key: str = ""
    value: str = ""
    fused_qkv: str = ""
    head_rows: tuple[str, ...] = ()
    fused_glu: bool = False
    grouped_kv: bool = False
    head_count_attrs: tuple[str, ...] = ()
    head_width_attrs: tuple[str, ...] = ()
    ffn_module: str | None = None
    ffn_size_attr: str | None = None

    def __post_init__(self) -> None:
        separate = (self.query, self.key, self.value)
        if bool(self.fused_qkv) == any(separate) or not (self.fused_qkv or all(separate)):
            raise ValueError(f"an Architecture names either fused_qkv or query/key/value, got {self}")
        if self.fused_glu and len(self.ffn_in) != 1:
            raise ValueError(f"fused_glu needs one FFN input Linear, got ffn_in={self.ffn_in}")


_BERT = Architecture(
    layers="encoder.layer", attention="attention.self", query="attention.self.query", key="attention.self.key",
    value="attention.self.value", attention_out="attention.output.dense", ffn_in=("intermediate.dense",),
    ffn_out="output.dense", head_size_attr="attention_head_size", head_count_attrs=("num_attention_heads",),
    head_width_attrs=("all_head_size",),
)
_DISTILBERT = Architecture(
    layers="transformer.layer", attention="attention", query="attention.q_lin", key="attention.k_lin",
    value="attention.v_lin", attention_out="attention.out_lin", ffn_in=("ffn.lin1",), ffn_out="ffn.lin2",
    head_size_attr="attention_head_size", head_count_attrs=("n_heads",),
)
_LLAMA = Architecture(
    layers="layers", attention="self_attn", query="self_attn.q_proj", key="self_attn.k_proj",
    value="self_attn.v_proj", attention_out="self_attn.o_proj", ffn_in=("mlp.gate_proj", "mlp.up_proj"),
    ffn_out="mlp.down_proj", head_size_attr="head_dim", grouped_kv=True, ffn_module="mlp",
    ffn_size_attr="intermediate_size",
)

_DEBERTA_V2 = Architecture(
    layers="encoder.layer", attention="attention.self", query="attention.self.query_proj",
    key="attention.self.key_proj", value="attention.self.value_proj", attention_out="attention.output.dense",
    head_rows=("attention.self.pos_key_proj", "attention.self.pos_query_proj"), ffn_in=("intermediate.dense",),
    ffn_out="output.dense", head_size_attr="attention_head_size", head_count_attrs=("num_attention_heads",),
    head_width_attrs=("all_head_size",),
)
_MODERNBERT = Architecture(
    layers="layers", attention="attn", fused_qkv="attn.Wqkv", attention_out="attn.Wo", ffn_in=("mlp.Wi",),
    ffn_out="mlp.Wo", fused_glu=True, head_size_attr="head_dim",  # its forward reads only head_dim
)

ARCHITECTURES: dict[str, Architecture] = {
    "bert": _BERT,
    "roberta": _BERT,
    "deberta-v2": _DEBERTA_V2,
    "modernbert": _MODERNBERT,
    "distilbert": _DISTILBERT,
    "llama": _LLAMA,
    "qwen2": _LLAMA,
    "mistral": _LLAMA,
}
"""``config.model_type`` → where its heads and FFN neurons are (the one table to extend for a new family)."""


def architecture_of(model: nn.Module) -> tuple[str, Architecture]:
    """``(model_type, Architecture)`` of a Hugging Face model; ValueError naming the supported ones otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"structured pruning does not know the architecture {model_type!r} ({type(model).__name__}); "
            f"supported model_type values: {sorted(ARCHITECTURES)}"
        )
    return model_type, ARCHITECTURES[model_type]


@dataclass
class CoupledLinear:
    """One Linear coupled to a kind of group: ``group_ids[j]`` is the global group of its row or column ``j``."""

    name: str
    axis: int
    """0: the group owns rows (output features, and the bias entries); 1: columns (input features)."""
    group_ids: torch.Tensor


@dataclass
class GroupSet:
    """All groups of one kind (heads or FFN neurons) across layers, numbered globally layer after layer.

    ``group_layer[g]``: layer index of group ``g``; ``sizes[l]``: groups in layer ``l``; ``weights_per_group``:
    coupled weights per group (the same for every group of a kind); ``unit``: rows/columns per group in each
    row-grouped Linear (``d`` for a head, ``1`` for a neuron; a Llama KV group has ``d`` rows in k/v, ``r·d`` in q).
    """

    kind: StructureKind
    linears: list[CoupledLinear]
    group_layer: torch.Tensor
    sizes: list[int]
    weights_per_group: int
    layer_modules: list[str] = field(default_factory=list)
    """The attention (heads) or FFN (ffn) module prefix of each layer, for attribute updates."""

    @property
    def num_groups(self) -> int:
        return int(self.group_layer.numel())

    def layer_offsets(self) -> list[int]:
        """Global id of each layer's first group."""
        out, acc = [], 0
        for size in self.sizes:
            out.append(acc)
            acc += size
        return out


@dataclass
class ModelStructures:
    """The coupled groups of a model, by kind."""

    model_type: str
    architecture: Architecture
    layer_prefixes: list[str]
    groups: dict[str, GroupSet]
    head_dim: int
    queries_per_group: int
    """Query heads removed with one head group: ``num_attention_heads / num_key_value_heads`` (1 without GQA)."""

    def linear_names(self) -> list[str]:
        """Qualified names of every coupled Linear (no Linear belongs to two kinds)."""
        return [c.name for g in self.groups.values() for c in g.linears]


def _layers(model: nn.Module, arch: Architecture) -> tuple[str, nn.ModuleList]:
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and (name == arch.layers or name.endswith("." + arch.layers)):
            return name, module
    raise ValueError(f"{type(model).__name__} has no layer list '*{arch.layers}' for its model_type")


_REMOVED = "(a sublayer removed by export_structured_model has no groups left to prune)"


def _linear(model: nn.Module, name: str) -> nn.Linear:
    try:
        module = model.get_submodule(name)
    except AttributeError as err:
        raise ValueError(f"{name}: no such module {_REMOVED}") from err
    if not isinstance(module, nn.Linear):
        raise ValueError(f"{name} is {type(module).__name__}, not an nn.Linear {_REMOVED}")
    return module


def find_structures(model: nn.Module, kinds: tuple[str, ...] | list[str] = STRUCTURE_KINDS) -> ModelStructures:
    """The head and/or FFN groups of ``model`` (works on already-sliced models: sizes are read from the Linears).

    Raises:
        ValueError: unsupported architecture, unknown kind, or Linears whose shapes do not fit the head size.
    """
    unknown = set(kinds) - set(STRUCTURE_KINDS)
    if unknown or not kinds:
        raise ValueError(f"structures must be a non-empty subset of {list(STRUCTURE_KINDS)}, got {list(kinds)}")
    model_type, arch = architecture_of(model)
    list_name, layers = _layers(model, arch)
    prefixes = [f"{list_name}.{i}" for i in range(len(layers))]
    attention = model.get_submodule(f"{prefixes[0]}.{arch.attention}")
    if not hasattr(attention, arch.head_size_attr):
        raise ValueError(f"{prefixes[0]}.{arch.attention} ({type(attention).__name__}) has no heads {_REMOVED}")
    head_dim = int(getattr(attention, arch.head_size_attr))
    rep = int(getattr(attention, "num_key_value_groups", 1)) if arch.grouped_kv else 1
    groups: dict[str, GroupSet] = {}
    if "heads" in kinds:
        groups["heads"] = _head_groups(model, arch, prefixes, head_dim, rep)
    if "ffn" in kinds:
        groups["ffn"] = _ffn_groups(model, arch, prefixes)
    return ModelStructures(model_type, arch, prefixes, groups, head_dim, rep)


LayerGroups = tuple[list["CoupledLinear"], int, int]
"""One layer's coupled Linears (group ids offset to be global), its group count, and weights per group."""


def _collect(kind: str, prefixes: list[str], modules: list[str], layer_fn: Any) -> GroupSet:
    """Concatenate the per-layer groups of ``layer_fn(prefix, offset) -> LayerGroups`` into one `GroupSet`."""
    linears: list[CoupledLinear] = []
    sizes: list[int] = []
    offset = weights_per_group = 0
    for prefix in prefixes:
        layer_linears, n, weights_per_group = layer_fn(prefix, offset)
        linears += layer_linears
        sizes.append(n)
        offset += n
    layer_of = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))
    return GroupSet(kind, linears, layer_of, sizes, weights_per_group, modules)


def _has(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


def _head_groups(model: nn.Module, arch: Architecture, prefixes: list[str], d: int, rep: int) -> GroupSet:
    """Attention heads: with grouped KV heads a group is one KV head with its ``rep`` query heads
    (q rows, k/v rows, o columns); a fused ``[q | k | v]`` Linear gives head ``h`` its rows ``h·d + j·H·d + [0, d)``
    for ``j = 0, 1, 2``; every ``head_rows`` Linear present gives the head its rows ``[h·d, (h+1)·d)``."""

    def layer(prefix: str, offset: int) -> LayerGroups:
        o = _linear(model, f"{prefix}.{arch.attention_out}")
        q_rows = o.in_features
        if arch.fused_qkv:
            qkv = _linear(model, f"{prefix}.{arch.fused_qkv}")
            kv_rows, shapes = q_rows, f"[q | k | v] {qkv.out_features}"
            fits = qkv.out_features == 3 * q_rows and rep == 1
        else:
            q, k, v = (_linear(model, f"{prefix}.{n}") for n in (arch.query, arch.key, arch.value))
            kv_rows, shapes = k.out_features, f"q {q.out_features}, k {k.out_features}, v {v.out_features}"
            fits = v.out_features == kv_rows and q.out_features == rep * kv_rows == q_rows
        if kv_rows % d or not fits:
            raise ValueError(
                f"{prefix}: attention shapes {shapes}, o {o.in_features} do not fit head size {d} with {rep} "
                "query heads per KV head"
            )
        q_ids = torch.arange(q_rows) // (d * rep) + offset
        kv_ids = torch.arange(kv_rows) // d + offset
        if arch.fused_qkv:
            rows = [(arch.fused_qkv, q_ids.repeat(3))]
        else:
            rows = [(arch.query, q_ids), (arch.key, kv_ids), (arch.value, kv_ids.clone())]
        rows += [(name, kv_ids.clone()) for name in arch.head_rows if _has(model, f"{prefix}.{name}")]
        linears = [CoupledLinear(f"{prefix}.{name}", 0, ids) for name, ids in rows]
        linears.append(CoupledLinear(f"{prefix}.{arch.attention_out}", 1, q_ids.clone()))
        groups = kv_rows // d
        row_weights = sum(_linear(model, lin.name).weight.numel() for lin in linears[:-1]) // groups
        return linears, groups, row_weights + rep * d * o.out_features

    return _collect("heads", prefixes, [f"{p}.{arch.attention}" for p in prefixes], layer)


def _ffn_groups(model: nn.Module, arch: Architecture, prefixes: list[str]) -> GroupSet:
    """FFN neurons: row i of every FFN input Linear (and its bias) with column i of the output Linear."""

    def layer(prefix: str, offset: int) -> LayerGroups:
        ins = [_linear(model, f"{prefix}.{n}") for n in arch.ffn_in]
        out = _linear(model, f"{prefix}.{arch.ffn_out}")
        n = out.in_features
        parts = 2 if arch.fused_glu else 1  # a fused GLU Linear holds [input | gate]: neuron i owns rows i, n + i
        if any(lin.out_features != parts * n for lin in ins):
            raise ValueError(
                f"{prefix}: FFN input Linears {[lin.out_features for lin in ins]} != {parts} x output's {n}"
            )
        ids = torch.arange(n) + offset
        linears = [CoupledLinear(f"{prefix}.{name}", 0, ids.repeat(parts)) for name in arch.ffn_in]
        linears.append(CoupledLinear(f"{prefix}.{arch.ffn_out}", 1, ids.clone()))
        return linears, n, parts * sum(lin.in_features for lin in ins) + out.out_features

    modules = [f"{p}.{arch.ffn_module}" if arch.ffn_module else "" for p in prefixes]
    return _collect("ffn", prefixes, modules, layer)


def group_reduce(groups: GroupSet, values: dict[str, torch.Tensor]) -> torch.Tensor:
    """``s_g = Σ_{(i,j) ∈ g} values[i, j]`` over every coupled weight of each group (float32, one vector [G]).

    ``values`` maps each coupled Linear's name to a tensor of its weight's shape (e.g. ``W²`` or ``|W·∂L/∂W|``).
    """
    first = values[groups.linears[0].name]
    total = torch.zeros(groups.num_groups, dtype=torch.float32, device=first.device)
    for lin in groups.linears:
        per_line = values[lin.name].float().sum(dim=1 - lin.axis)
        total.index_add_(0, lin.group_ids.to(total.device), per_line)
    return total


def element_masks(groups: GroupSet, keep: torch.Tensor, shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """Boolean keep-masks ``[out, in]`` of every coupled Linear implied by the group mask ``keep`` [G]."""
    out = {}
    for lin in groups.linears:
        line = keep.to(torch.bool)[lin.group_ids.to(keep.device)]
        shape = shapes[lin.name]
        out[lin.name] = (line[:, None] if lin.axis == 0 else line[None, :]).expand(shape).contiguous()
    return out


def bias_masks(groups: GroupSet, keep: torch.Tensor) -> dict[str, torch.Tensor]:
    """Keep-masks of the biases owned by the groups (those of row-grouped Linears: ``keep[group_ids]``)."""
    return {lin.name: keep.to(torch.bool)[lin.group_ids.to(keep.device)] for lin in groups.linears if lin.axis == 0}


def kept_groups(groups: GroupSet, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """Group mask [G] of the groups with at least one non-zero coupled weight (all-zero = removed).

    An all-zero group contributes nothing to the output whatever its biases: its output-side columns (attention
    output dense / FFN output) are zero."""
    return group_reduce(groups, {n: (w != 0) for n, w in weights.items()}) > 0


def kept_sizes(groups: GroupSet, keep: torch.Tensor) -> list[int]:
    """Kept groups per layer."""
    counts = torch.zeros(len(groups.sizes), dtype=torch.long)
    counts.index_add_(0, groups.group_layer, keep.to(device="cpu", dtype=torch.long))
    return counts.tolist()
