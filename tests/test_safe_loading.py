"""Loading never unpickles: every ``torch.load`` in the package (and its tests) passes ``weights_only=True``."""

import ast
from pathlib import Path

import prune_trainer

ROOTS = (Path(prune_trainer.__file__).parent, Path(__file__).parent)


def _unsafe_torch_loads(source: str) -> list[int]:
    """Line numbers of ``torch.load(...)`` calls without a literal ``weights_only=True``."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load"):
            continue
        if not (isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"):
            continue
        safe = any(
            kw.arg == "weights_only" and isinstance(kw.value, ast.Constant) and kw.value.value is True
            for kw in node.keywords
        )
        if not safe:
            lines.append(node.lineno)
    return lines


def test_the_checker_flags_a_bare_torch_load():
    assert _unsafe_torch_loads("import torch\ntorch.load(p)\ntorch.load(p, weights_only=False)\n") == [2, 3]
    assert _unsafe_torch_loads("torch.load(p, map_location='cpu', weights_only=True)") == []


def test_every_torch_load_uses_weights_only():
    unsafe = [
        f"{path}:{line}"
        for root in ROOTS
        for path in sorted(root.rglob("*.py"))
        for line in _unsafe_torch_loads(path.read_text())
    ]
    assert not unsafe, f"torch.load without weights_only=True at {unsafe}"
