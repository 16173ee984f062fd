"""Provenance of results: the commit of the code that produced them."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit() -> str:
    """Current commit of the project checkout (``+dirty`` when there are uncommitted changes); ``unknown`` outside
    a git checkout (an installed package)."""
    root = Path(__file__).resolve().parents[1]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
