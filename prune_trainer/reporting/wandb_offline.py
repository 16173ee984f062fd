"""Read the history of an offline W&B run (``wandb/offline-run-*/run-*.wandb``) without the network.

The ``.wandb`` file is a LevelDB-style log: a 7-byte file header (``:W&B``, magic, version), then
32 KiB blocks of chunks, each ``crc32 (4) | length (2) | type (1) | payload`` with type FULL=1,
FIRST=2, MIDDLE=3, LAST=4; each reassembled payload is a serialized ``wandb.proto.Record``.
"""

from __future__ import annotations

import glob
import json
import os
import struct
from pathlib import Path
from typing import Any

_HEADER = 7
_BLOCK = 32768


def _records(path: str | os.PathLike) -> list[bytes]:
    data = Path(path).read_bytes()
    if not data.startswith(b":W&B"):
        raise ValueError(f"{path} is not a W&B run file (no ':W&B' header)")
    pos, out, pending = _HEADER, [], b""
    while pos + _HEADER <= len(data):
        left = _BLOCK - (pos % _BLOCK)
        if left < _HEADER:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        pos += _HEADER
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left - _HEADER
            continue
        if pos + length > len(data):  # a record still being written (wandb-core writes asynchronously): stop
            break
        chunk = data[pos : pos + length]
        pos += length
        if kind == 1:
            out.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            out.append(pending + chunk)
    return out


def read_wandb_history(run_file_or_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """All ``wandb.log`` rows of an offline run, as dicts of decoded JSON values."""
    from wandb.proto import wandb_internal_pb2 as pb

    path = Path(run_file_or_dir)
    if path.is_dir():
        files = sorted(glob.glob(str(path / "**" / "run-*.wandb"), recursive=True))
        if not files:
            raise FileNotFoundError(f"no run-*.wandb file under {path}")
        path = Path(files[-1])
    rows = []
    for payload in _records(path):
        record = pb.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {(item.key or "/".join(item.nested_key)): json.loads(item.value_json) for item in record.history.item}
            )
    return rows


def sparsity_curve_from_wandb(run_file_or_dir: str | os.PathLike) -> dict[str, list[float]]:
    """``{"step", "global", "target"}`` lists from the ``train/sparsity/*`` keys of an offline W&B run."""
    curve: dict[str, list[float]] = {"step": [], "global": [], "target": []}
    for row in read_wandb_history(run_file_or_dir):
        if "train/sparsity/global" in row:
            curve["step"].append(row.get("train/global_step", row.get("_step")))
            curve["global"].append(row["train/sparsity/global"])
            curve["target"].append(row.get("train/sparsity/target"))
    return curve
