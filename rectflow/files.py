"""Files that survive a kill: every write in rectflow goes through a temp file in the target's folder, flushed to
disk, then `os.replace` (a reader sees the old file or the new one, never part of one); tolerant JSON readers.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator


def fsync(path: str | Path) -> None:
    """Flush a file or directory to disk, so a crash cannot reorder it after a later rename."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temp path beside `path` for any writer (safetensors, torch.save, savefig); on success it is flushed
    and renamed onto `path`, on an error removed. `suffix` (default: path's) keeps writers that look at it happy."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix if suffix is None else suffix,
                               dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        fsync(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write bytes atomically."""
    with atomic_path(path, suffix=".tmp") as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write a text file atomically (UTF-8)."""
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json(path: str | Path, obj, indent: int | None = 1, sort_keys: bool = True) -> None:
    """Write JSON atomically."""
    write_text_atomic(path, json.dumps(obj, indent=indent, sort_keys=sort_keys))


def read_json(path: str | Path):
    """JSON from a file, or None when it does not exist."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file ([] when absent); a line cut short by a kill is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    return records


@contextlib.contextmanager
def file_lock(path: str | Path):
    """Hold an exclusive lock on `path` (blocking): one process at a time fills a cache shared by workers."""
    import fcntl
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
