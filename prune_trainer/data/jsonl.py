"""JSON Lines input files (evaluation pairs, labelled texts): one JSON object per line, errors naming file:line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def read_jsonl_objects(path: str | Path, fields: dict[str, type | tuple[type, ...]]) -> Iterator[tuple[int, dict]]:
    """``(line number, object)`` for every non-blank line of ``path``; ValueError naming ``file:line`` when a line
    is not valid JSON or not an object whose ``fields`` have the given types."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"JSON Lines file {str(path)!r} does not exist")
    wanted = " and ".join(repr(f) for f in fields)
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row: Any = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not valid JSON ({err.msg}): {line[:80]!r}") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(f), t) for f, t in fields.items()):
            raise ValueError(f"{path}:{n}: each line must be a JSON object with {wanted} "
                             f"({', '.join(f'{f}: {_names(t)}' for f, t in fields.items())}), got {line[:80]!r}")
        yield n, row


def _names(types: type | tuple[type, ...]) -> str:
    return " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
