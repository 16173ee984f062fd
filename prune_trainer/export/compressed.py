"""Compressed checkpoints: pruned Linear weights as a packed bitmask + non-zeros, or N:M values + in-group
indices, optionally INT8 (per output channel, symmetric), in one safetensors file described by ``compression.json``.

Storage per pruned ``[out, in]`` weight with ``nnz`` non-zeros (``b`` bytes per value: 4 fp32, 1 INT8):

- ``bitmask``: ``ceil(out·in/8) + b·nnz`` bytes (+ ``4·out`` INT8 scales);
- ``nm`` (N:M): ``b·out·in·N/M + ceil(out·in·N/M·ceil(log2 M)/8)`` bytes (+ ``4·out``).

The overview's point (pruning lesson §5): the format decides whether sparsity saves anything; a bitmask beats dense
storage once more than 1/32 (fp32) or 1/8 (INT8) of the weights are zero, so a layer is stored as a bitmask only
then (or when named). With ``quantize="int8"`` every Linear and Embedding weight is INT8 per row; the word
embeddings can also be stored as rank-r factors ``A B`` (truncated SVD, Eckart–Young; lossy, like any
r < hidden), or trimmed to the vocabulary rows a task uses (a row bitmask + the kept rows; every other token loads
as the unknown token's row).
Everything else is stored as is. The JSON layout records the file's byte size and SHA-256, so a truncated or
corrupt file is a clear error, never a wrong model; loading uses safetensors and JSON only (no pickle, no code).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from prune_trainer.export.packing import (
    bitmask_decode,
    bitmask_encode,
    dequantize_int4,
    dequantize_int8,
    index_bits,
    nm_decode,
    nm_encode,
    pack_bits,
    quantize_int4,
    quantize_int8,
    unpack_bits,
)

LAYOUT_FILE = "compression.json"
WEIGHTS_FILE = "model.compressed.safetensors"
FORMATS = ("dense", "bitmask", "nm")
QUANTIZE = (None, "int8")
EMBEDDING_QUANT = (None, "int8", "int4")
INT4_GROUP = 128
LAYOUT_VERSION = 1


@dataclass(frozen=True)
class CompressionSpec:
    """How to store a model: ``format`` (dense | bitmask | nm), ``quantize`` (None | "int8"), the N:M pattern,
    the word embeddings' factorization rank (None: full matrix) or the vocabulary rows to keep (the others load as
    row ``embedding_fill``, the unknown token), and explicit layers to encode (None: automatic)."""

    format: str = "dense"
    quantize: str | None = None
    pattern: str = "2:4"
    embedding_rank: int | None = None
    layers: tuple[str, ...] | None = None
    embedding_rows: tuple[int, ...] | None = None
    embedding_fill: int | None = None
    embedding_quant: str | None = None

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {list(FORMATS)}, got {self.format!r}")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"quantize must be None or 'int8', got {self.quantize!r}")
        if self.format == "nm":
            self.nm()
        if self.embedding_rank is not None and (not isinstance(self.embedding_rank, int) or self.embedding_rank < 1):
            raise ValueError(f"embedding_rank must be a positive integer, got {self.embedding_rank!r}")
        if self.embedding_quant not in EMBEDDING_QUANT:
            raise ValueError(f"embedding_quant must be None, 'int8' or 'int4', got {self.embedding_quant!r}")
        if self.embedding_quant == "int4" and self.embedding_rank is not None:
            raise ValueError("embedding_quant='int4' applies to full or trimmed embeddings, not to embedding_rank")
        if self.embedding_rows is not None:
            if self.embedding_rank is not None:
                raise ValueError("give embedding_rank or embedding_rows, not both")
            if self.embedding_fill is None or self.embedding_fill not in set(self.embedding_rows):
                raise ValueError(f"embedding_fill ({self.embedding_fill!r}, e.g. the [UNK] id) must be a kept row")

    @property
    def plain(self) -> bool:
        """A plain ``save_pretrained`` checkpoint (nothing to compress)."""
        return (self.format == "dense" and self.quantize is None and self.embedding_rank is None
                and self.embedding_rows is None and self.embedding_quant is None)

    def nm(self) -> tuple[int, int]:
        """``(N, M)`` from ``pattern`` ("2:4")."""
        parts = str(self.pattern).split(":")
        if len(parts) != 2 or not all(p.isdigit() for p in parts):
            raise ValueError(f"format='nm' needs an N:M pattern like '2:4', got {self.pattern!r}")
        n, m = int(parts[0]), int(parts[1])
        if not (2 <= m <= 16 and 1 <= n < m):
            raise ValueError(f"N:M pattern {self.pattern!r} not supported: need 2 ≤ M ≤ 16 and 1 ≤ N < M")
        return n, m


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without second names of a shared tensor (tied weights are restored by the loader)."""
    seen: set[int] = set()
    state = {}
    for name, tensor in model.state_dict().items():
        key = tensor.data_ptr() if tensor.numel() else id(tensor)
        if key in seen:
            continue
        seen.add(key)
        state[name] = tensor.detach().cpu().contiguous()
    return state


def _weight_roles(model: nn.Module) -> tuple[dict[str, str], str | None]:
    """``{weight name: "linear" | "embedding"}`` and the word embeddings' weight name."""
    roles = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            roles[f"{name}.weight"] = "linear"
        elif isinstance(module, nn.Embedding):
            roles[f"{name}.weight"] = "embedding"
    word = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    word_name = next((f"{n}.weight" for n, m in model.named_modules() if m is word), None)
    return roles, word_name


def _sparse_layers(state: dict[str, torch.Tensor], roles: dict[str, str], spec: CompressionSpec) -> set[str]:
    """Weights to encode sparsely: ``spec.layers`` (module names) when given; else for N:M every Linear at least
    ``1 - N/M`` sparse, for a bitmask every Linear whose bitmask storage is smaller than dense storage."""
    if spec.format == "dense":
        return set()
    if spec.layers is not None:
        names = {f"{layer}.weight" for layer in spec.layers}
        unknown = sorted(n for n in names if roles.get(n) != "linear")
        if unknown:
            raise ValueError(f"layers {unknown} are not Linear weights of the model")
        return names
    value_bytes = 1 if spec.quantize else 4
    chosen = set()
    for name, role in roles.items():
        if role != "linear" or name not in state:
            continue
        zero_frac = float((state[name] == 0).float().mean())
        if spec.format == "nm":
            n, m = spec.nm()
            if zero_frac >= 1 - n / m - 1e-9:
                chosen.add(name)
        elif zero_frac > 1 / (8 * value_bytes):
            chosen.add(name)
    return chosen


def _quantize(w: torch.Tensor, quant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(stored values, scales)`` of a 2-D weight: INT8 per row, or INT4 in groups of `int4_group`."""
    return quantize_int4(w, int4_group(w.shape[1])) if quant == "int4" else quantize_int8(w)


def int4_group(cols: int) -> int:
    """INT4 group size of rows of ``cols`` values: 128 when it divides them, else the whole row."""
    return INT4_GROUP if cols % INT4_GROUP == 0 else cols


def _encode_weight(name: str, w: torch.Tensor, encoding: str, spec: CompressionSpec, quant: str | None
                   ) -> tuple[dict, dict]:
    """Tensors (keyed by ``name.<part>``) and the layout entry of one weight (``quant``: None, int8, int4); values
    that are not quantized keep the weight's dtype (a bf16 model stays bf16)."""
    entry: dict[str, Any] = {"encoding": encoding, "shape": list(w.shape), "dtype": str(w.dtype).split(".")[-1],
                             "quant": quant}
    if quant == "int4":
        entry["group"] = int4_group(w.shape[1])
    parts: dict[str, torch.Tensor] = {}
    if encoding == "lowrank":
        u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
        r = spec.embedding_rank
        a, b = (u[:, :r] * s[:r]).float().contiguous(), vh[:r].float().contiguous()
        entry["rank"] = r
        for part, t in (("a", a), ("b", b)):
            if quant:
                parts[f"{name}.{part}"], parts[f"{name}.{part}_scale"] = quantize_int8(t)
            else:
                parts[f"{name}.{part}"] = t
        return parts, entry
    if encoding == "rows":
        keep = torch.zeros(w.shape[0], dtype=torch.bool)
        keep[torch.tensor(spec.embedding_rows, dtype=torch.long)] = True
        w = w[keep]
        parts[f"{name}.rows"] = pack_bits(keep)
        entry.update(fill=int(spec.embedding_fill), kept=int(keep.sum()))
    if quant:
        w, parts[f"{name}.scale"] = _quantize(w, quant)
    if encoding == "bitmask":
        parts[f"{name}.mask"], parts[f"{name}.values"] = bitmask_encode(w)
        entry["nnz"] = parts[f"{name}.values"].numel()
    elif encoding == "nm":
        n, m = spec.nm()
        parts[f"{name}.values"], parts[f"{name}.index"] = nm_encode(w, n, m, name=name)
        entry.update(n=n, m=m)
    else:
        parts[f"{name}.values"] = w
    return parts, entry


def encode_model(model: nn.Module, spec: CompressionSpec) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All tensors to save and the layout (without the file's checksum). In memory: nothing is written, so a
    layer that is not N:M raises here, before any file exists.

    Raises:
        ValueError: a named/selected layer is not N:M, an embedding rank too large, non-finite weights.
    """
    state = _unique_state(model)
    roles, word = _weight_roles(model)
    sparse = _sparse_layers(state, roles, spec)
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    raw: list[str] = []
    for name, tensor in state.items():
        role = roles.get(name)
        if spec.embedding_rank is not None and name == word:
            if spec.embedding_rank >= min(tensor.shape):
                raise ValueError(f"embedding_rank {spec.embedding_rank} must be below {min(tensor.shape)} ({name})")
            encoding = "lowrank"
        elif spec.embedding_rows is not None and name == word:
            if not 0 <= min(spec.embedding_rows) <= max(spec.embedding_rows) < tensor.shape[0]:
                raise ValueError(f"embedding_rows must be ids in [0, {tensor.shape[0]}) for {name}")
            encoding = "rows"
        elif name in sparse:
            encoding = spec.format
        elif role is not None and (spec.quantize or (name == word and spec.embedding_quant)):
            encoding = "dense"
        else:
            tensors[name] = tensor  # stored as is
            raw.append(name)
            continue
        quant = (spec.embedding_quant or spec.quantize) if name == word else spec.quantize
        parts, entries[name] = _encode_weight(name, tensor, encoding, spec, quant)
        tensors.update(parts)
    settings = {k: v for k, v in asdict(spec).items() if k != "embedding_rows"}  # the rows are in the file
    layout = {"version": LAYOUT_VERSION, **settings, "file": WEIGHTS_FILE, "entries": entries, "raw": raw}
    return tensors, layout


def write_compressed(tensors: dict[str, torch.Tensor], layout: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Save the tensors to ``folder/model.compressed.safetensors`` and the layout, with the file's byte size and
    SHA-256, to ``folder/compression.json`` (inside an `atomic_dir` block of the caller). Returns the layout."""
    weights = Path(folder) / WEIGHTS_FILE
    save_file(tensors, str(weights))
    layout = {**layout, "file_bytes": weights.stat().st_size, "sha256": _sha256(weights)}
    (Path(folder) / LAYOUT_FILE).write_text(json.dumps(layout, indent=1))
    return layout


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_compressed_dir(path: str | Path) -> bool:
    """Whether ``path`` holds a compressed checkpoint (``compression.json``)."""
    return (Path(path) / LAYOUT_FILE).is_file()


def read_layout(path: str | Path) -> dict[str, Any]:
    """The parsed ``compression.json`` after checking the weights file against its recorded size and SHA-256.

    Raises:
        ValueError: unreadable layout, unknown version, a truncated/extended or corrupt weights file.
    """
    path = Path(path)
    try:
        layout = json.loads((path / LAYOUT_FILE).read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"{path / LAYOUT_FILE} is unreadable or not JSON: {err}") from None
    if layout.get("version") != LAYOUT_VERSION or layout.get("file") != WEIGHTS_FILE:
        raise ValueError(f"{path / LAYOUT_FILE}: unknown layout version {layout.get('version')!r}")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing")
    size = weights.stat().st_size
    if size != layout["file_bytes"]:
        raise ValueError(f"{weights} is truncated or damaged: {size} bytes, the layout records {layout['file_bytes']}")
    if _sha256(weights) != layout["sha256"]:
        raise ValueError(f"{weights} is corrupt: its SHA-256 differs from the one recorded in {LAYOUT_FILE}")
    return layout


def _dequantize(values: torch.Tensor, entry: dict[str, Any], scale: torch.Tensor | None) -> torch.Tensor:
    """Float32 values of a stored 2-D part: as is, INT8 per row, or INT4 groups."""
    if entry.get("quant") == "int4":
        return dequantize_int4(values, scale, int(entry["group"]))
    return dequantize_int8(values, scale) if entry.get("quant") == "int8" else values.float()


def _decode_entry(name: str, entry: dict[str, Any], parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float tensor of one layout entry from its stored parts (dequantized when INT8/INT4)."""
    shape = tuple(entry["shape"])
    dtype = getattr(torch, entry["dtype"])
    if entry["encoding"] == "lowrank":
        a, b = (_dequantize(parts[f"{name}.{p}"], entry, parts.get(f"{name}.{p}_scale")) for p in ("a", "b"))
        return (a @ b).to(dtype).reshape(shape)
    values, scale = parts[f"{name}.values"], parts.get(f"{name}.scale")
    if entry.get("quant") and scale is None:
        raise KeyError(f"{name}.scale")
    if entry["encoding"] == "rows":
        return _decode_rows(name, entry, parts[f"{name}.rows"], _dequantize(values, entry, scale)).to(dtype)
    if entry["encoding"] == "bitmask":
        w = bitmask_decode(parts[f"{name}.mask"], values, shape)
    elif entry["encoding"] == "nm":
        w = nm_decode(values, parts[f"{name}.index"], shape, int(entry["n"]), int(entry["m"]))
    elif entry["encoding"] == "dense":
        w = values if entry.get("quant") == "int4" else values.reshape(shape)
    else:
        raise ValueError(f"{name}: unknown encoding {entry['encoding']!r}")
    return _dequantize(w, entry, scale).reshape(shape).to(dtype)


def _decode_rows(name: str, entry: dict[str, Any], rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """A trimmed-vocabulary embedding: the kept rows in place, every other row a copy of row ``fill``."""
    vocab, _ = entry["shape"]
    keep = unpack_bits(rows, vocab)
    if int(keep.sum()) != values.shape[0] or not bool(keep[entry["fill"]]):
        raise ValueError(f"{name}: the row mask keeps {int(keep.sum())} rows (fill row kept: "
                         f"{bool(keep[entry['fill']])}) but {values.shape[0]} rows are stored")
    position = torch.cumsum(keep.long(), 0) - 1  # row i is stored at position[i] when kept
    source = torch.where(keep, position, position[entry["fill"]])
    return values[source]


def read_compressed(path: str | Path) -> dict[str, torch.Tensor]:
    """The model's state dict (float tensors, zeros exact) from a compressed checkpoint folder; safetensors and
    JSON only. Raises ValueError on any size/checksum/shape mismatch."""
    layout = read_layout(path)
    stored = load_file(str(Path(path) / WEIGHTS_FILE))
    state = {name: stored[name] for name in layout["raw"]}
    for name, entry in layout["entries"].items():
        try:
            state[name] = _decode_entry(name, entry, stored)
        except KeyError as err:
            raise ValueError(f"{path}: part {err} of {name} is missing from {WEIGHTS_FILE}") from None
        except RuntimeError as err:  # a shape that does not fit the stored parts
            raise ValueError(f"{path}: {name} does not match its layout entry: {err}") from None
    return state


def expected_bytes(shape: tuple[int, int], nnz: int, encoding: str, quantize: str | None, nm: tuple[int, int] = (2, 4),
                   ) -> int:
    """The formula: bytes of one encoded ``[out, in]`` weight's tensors (without safetensors' header)."""
    out_f, in_f = shape
    b = 1 if quantize == "int8" else 4
    scales = 4 * out_f if quantize == "int8" else 0
    if encoding == "bitmask":
        return math.ceil(out_f * in_f / 8) + b * nnz + scales
    if encoding == "nm":
        n, m = nm
        kept = out_f * in_f // m * n
        return b * kept + math.ceil(kept * index_bits(m) / 8) + scales
    return b * out_f * in_f + scales
