"""Atomic writes: a file or a folder is either complete or absent, whatever kills the process.

A file is written to a temporary sibling in the same directory, flushed and fsynced, then moved over the target
with `os.replace` (atomic on POSIX and Windows when both are on one file system). A folder is built in a
``<path>.tmp-<pid>`` sibling and renamed into place when its block succeeds; on failure it is removed.
`exclusive_lock` holds a pid lock file, so that one process at a time writes a folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


class RunInProgressError(RuntimeError):
    """Another live process holds the lock."""


def _fsync_dir(path: Path) -> None:
    """Flush a directory entry (the rename itself) to disk where the OS allows opening directories."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # Windows cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write (by any writer: ``torch.save``, safetensors, ...); when the
    block succeeds it is fsynced and moved over ``path`` with `os.replace`, on error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (`atomic_file`); return the path."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int = 2) -> Path:
    """`atomic_write_text` of ``json.dumps(data, indent=indent, default=str)``."""
    return atomic_write_text(path, json.dumps(data, indent=indent, default=str))


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (signal 0 probes without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty ``<path>.tmp-<pid>`` sibling to fill; on success it replaces ``path``, on error it is removed.

    An existing ``path`` is first renamed to ``<path>.old-<pid>`` and deleted only after the new folder is in
    place, so at every instant ``path`` is either the old complete folder, absent, or the new complete folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    old = path.with_name(f"{path.name}.old-{os.getpid()}")
    for pattern in (f"{path.name}.tmp-*", f"{path.name}.old-*"):  # left by this pid or by a killed process
        for leftover in path.parent.glob(pattern):
            pid = leftover.name.rsplit("-", 1)[1]
            if not pid.isdigit() or int(pid) == os.getpid() or not _pid_alive(int(pid)):
                shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        for child in tmp.rglob("*"):
            if child.is_file():
                with open(child, "rb") as f:
                    os.fsync(f.fileno())
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(path.parent)


def _lock_holder(path: Path, wait_s: float = 1.0) -> tuple[int | None, str]:
    """The pid in lock file ``path`` (and its text); an empty file is re-read for ``wait_s`` (its creator may be
    between ``open`` and ``write``)."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            text = path.read_text().strip()
        except FileNotFoundError:
            return None, ""
        if text or time.monotonic() > deadline:
            return (int(text) if text.isdigit() else None), text
        time.sleep(0.05)


@contextlib.contextmanager
def exclusive_lock(path: str | os.PathLike, log: Callable[[str], None] = print) -> Iterator[Path]:
    """Hold the lock file ``path`` (created with ``O_CREAT | O_EXCL``, holding our pid) for the block; the lock of
    a dead process is taken over with a note, that of a live one raises `RunInProgressError`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            pid, text = _lock_holder(path)
            if pid is not None and _pid_alive(pid):
                raise RunInProgressError(
                    f"{path.parent} is in use by another run (pid {pid}, lock {path}); wait for it to finish"
                ) from None
            log(f"note: taking over the stale lock {path} (pid {pid or text!r} is not running)")
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        break
    else:
        raise RunInProgressError(f"could not take the lock {path}: another run took it first")
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            if path.read_text().strip() == str(os.getpid()):
                path.unlink()
