"""House rule checked: no function in the library, the study, the benchmarks or the scripts is longer than 60 lines
(decorators excluded), so that each one does one job a reader can hold at once."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ("prune_trainer", "study", "benchmarks", "scripts")
MAX_LINES = 60


def long_functions(root: Path = ROOT, folders: tuple[str, ...] = FOLDERS, limit: int = MAX_LINES) -> list[str]:
    found = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > limit:
                        found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_is_longer_than_60_lines():
    assert long_functions() == []


def test_the_check_finds_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    assert long_functions(tmp_path, ("pkg",)) == [f"pkg/m.py:5 long ({MAX_LINES + 1} lines)"]
