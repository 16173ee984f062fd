"""Typed options: dataclasses whose fields are checked against their type hints once, at construction.

Every method's options (`MagnitudeOptions`, `MovementOptions`, ...) and the pruning config derive from
`Options`. A field typed ``Literal[...]`` accepts only those values, ``int`` only integers (not bools),
``float`` integers or floats, ``X | None`` also None, ``list[str]`` only a list of strings (a bare string
is an error, not a list of characters). ``from_dict`` rejects unknown keys, naming the allowed ones and
the closest match; ``to_dict`` gives plain YAML/JSON values back (``from_dict(to_dict())`` is the identity).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable
from enum import Enum
from typing import Any, ClassVar, Literal, TypeVar, Union, get_args, get_origin

T = TypeVar("T", bound="Options")


def unknown_key_error(where: str, unknown: Iterable[str], allowed: Iterable[str]) -> ValueError:
    """``ValueError`` naming the unknown key(s), the closest allowed one for each, and the allowed ones:
    ``"<where>: unknown key 'trainig'; did you mean 'training'? (allowed: data, model, ...)"``."""
    allowed = sorted(allowed)
    parts = []
    for key in sorted(unknown, key=str):
        close = difflib.get_close_matches(str(key), allowed, n=1)
        parts.append((repr(key), f"did you mean {close[0]!r}?" if close else ""))
    if len(parts) == 1:
        (key, hint), = parts
        text = f"unknown key {key}" + (f"; {hint}" if hint else "")
    else:
        text = "unknown keys " + ", ".join(f"{k} ({h})" if h else k for k, h in parts)
    return ValueError(f"{where}: {text} " + (f"(allowed: {', '.join(allowed)})" if allowed else "(none are allowed)"))


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_describe(a) for a in get_args(tp))
    if origin is list:
        return f"list[{_describe(get_args(tp)[0])}]"
    return "None" if tp is type(None) else getattr(tp, "__name__", str(tp))


def matches_type(value: Any, tp: Any, lenient_classes: bool = False) -> bool:
    """Whether ``value`` fits the type hint ``tp``: unions, ``Literal``, ``list[...]``, dict, Enum (by value),
    int, float (an int is accepted), str, bool. Other classes need an instance, or with ``lenient_classes``
    are accepted (values YAML cannot produce, left to the constructor, as in `TrainingArguments`)."""
    origin = get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return any(matches_type(value, a, lenient_classes) for a in get_args(tp))
    if tp is list or origin is list:
        item = get_args(tp)
        return isinstance(value, list) and (not item or all(matches_type(v, item[0], lenient_classes) for v in value))
    if tp is dict or origin is dict:
        return isinstance(value, dict)
    if isinstance(tp, type) and issubclass(tp, Enum):
        return isinstance(value, tp) or value in {m.value for m in tp}
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is str or tp is bool:
        return isinstance(value, tp)
    if isinstance(tp, type):
        return isinstance(value, tp) or lenient_classes
    return True


@dataclasses.dataclass
class Options:
    """Base of typed option dataclasses: type-checked fields, strict ``from_dict``, ``to_dict``."""

    section: ClassVar[str] = "options"
    """How error messages name this block (e.g. ``'movement options'``)."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Options):
                continue
            tp = hints[f.name]
            if get_origin(tp) is list and isinstance(value, tuple):
                value = list(value)
                setattr(self, f.name, value)
            floaty = tp is float or float in get_args(tp)
            if floaty and int not in get_args(tp) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)  # YAML reads 1 as an int; a float field holds 1.0
                setattr(self, f.name, value)
            if not matches_type(value, tp):
                raise ValueError(f"{self.section}: {f.name} must be {_describe(tp)}, got {value!r}")
        self.validate()

    def validate(self) -> None:
        """Checks beyond the types (ranges, combinations); raise ``ValueError`` naming the field."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ValueError(f"{cls.section} must be a mapping, got {data!r}")
        unknown = set(data) - set(cls.field_names())
        if unknown:
            raise unknown_key_error(cls.section, unknown, cls.field_names())
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, Options) else (
                list(value) if isinstance(value, (list, tuple)) else value
            )
        return out

    def replace(self: T, **changes: Any) -> T:
        """A validated copy with ``changes`` applied (unknown names are an error)."""
        unknown = set(changes) - set(self.field_names())
        if unknown:
            raise unknown_key_error(self.section, unknown, self.field_names())
        return dataclasses.replace(self, **changes)
