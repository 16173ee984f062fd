"""YAML loading for recipes, plans and pruning configs, with floats written the way people write them.

PyYAML implements YAML 1.1, where ``2e-4`` and ``1.0e4`` (no dot, or no exponent sign) are *strings*;
`TrainingArguments` would then get ``learning_rate='2e-4'`` and fail far from the recipe. `load_yaml` reads
every YAML 1.2 decimal float (``2e-4``, ``1E5``, ``1.0e4``, ``.5e-3``) as a float; everything else is
`yaml.safe_load`'s reading.
"""

from __future__ import annotations

import re
from typing import Any

import yaml


class _Loader(yaml.SafeLoader):
    """`yaml.SafeLoader` plus the YAML 1.2 exponent floats that YAML 1.1 reads as strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse YAML text safely, reading ``2e-4``-style numbers as floats."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass
