"""Atomic files and folders: complete or absent; the pid lock file."""

import json
import os
import subprocess
import sys

import pytest

from prune_trainer.io import RunInProgressError, atomic_dir, atomic_write_json, atomic_write_text, exclusive_lock


def test_atomic_write_replaces_and_leaves_no_temp_file(tmp_path):
    path = tmp_path / "sub" / "m.json"
    atomic_write_json(path, {"a": 1})
    atomic_write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert sorted(p.name for p in path.parent.iterdir()) == ["m.json"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "r.md"
    atomic_write_text(path, "old")

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["r.md"]


def test_atomic_dir_is_complete_or_absent(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("killed mid-export")
    assert list(tmp_path.iterdir()) == []  # neither model/ nor its temp sibling
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError
    assert [p.name for p in target.iterdir()] == ["a"]  # a failed replacement keeps the old folder
    with atomic_dir(target) as tmp:
        (tmp / "b").write_text("2")
    assert [p.name for p in target.iterdir()] == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_lock_is_exclusive_and_a_dead_pid_is_taken_over(tmp_path, capsys):
    lock = tmp_path / ".lock"
    with exclusive_lock(lock):
        assert lock.read_text() == str(os.getpid())
        with pytest.raises(RunInProgressError, match=f"pid {os.getpid()}"):
            with exclusive_lock(lock):
                pass
    assert not lock.exists()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock.write_text(dead.stdout.strip())
    with exclusive_lock(lock):
        assert lock.read_text() == str(os.getpid())
    assert "taking over the stale lock" in capsys.readouterr().out
