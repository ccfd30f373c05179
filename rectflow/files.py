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


def _umask() -> int:
    """The process umask (reading it means setting it; set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# read once: setting the umask to read it is process-wide, and the async checkpoint writer creates files in a thread
UMASK = _umask()


def permit(path: str | Path) -> Path:
    """Give a file or folder made by tempfile (mode 0600 / 0700) the mode a plain open() / mkdir() would give it,
    so checkpoints and shipped files are readable wherever the user's umask says they should be."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~UMASK)
    return Path(path)


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
        permit(tmp)
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


class DamagedFile(ValueError):
    """A file that is not what its name or role says (truncated, empty, another format); the message names it."""


MAX_HEADER = 100 * 2**20  # safetensors caps its JSON header at 100 MB
MAGIC = {b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"PK\x03\x04": "a zip / torch.save file",
         b"\x80": "a pickle", b"GIF8": "a GIF image", b"RIFF": "a RIFF (WebP) image"}


def _kind_of(head: bytes) -> str | None:
    """What a file's first bytes say it is, when they say."""
    return next((kind for magic, kind in MAGIC.items() if head.startswith(magic)), None)


def check_safetensors(path: str | Path) -> dict:
    """The JSON header of a safetensors file, after checking that the header is whole and the tensors' byte ranges
    end exactly at the end of the file; DamagedFile (naming the file and what is wrong) otherwise."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        kind = _kind_of(head)
        if size < 8 or n < 2 or n > min(MAX_HEADER, size - 8):
            what = f"it is {kind}" if kind else ("it is empty" if size == 0 else
                                                 "truncated, or another format")
            raise DamagedFile(f"{path} is not a readable safetensors file ({size} bytes; {what})")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DamagedFile(f"{path} is not a readable safetensors file (its header is not valid JSON: "
                              f"{err})") from None
    if not isinstance(header, dict):
        raise DamagedFile(f"{path} is not a readable safetensors file (its header is not a JSON object)")
    try:
        end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"], default=0)
    except (TypeError, KeyError, IndexError) as err:
        raise DamagedFile(f"{path} is not a readable safetensors file (malformed tensor entry: {err!r})") from None
    if 8 + n + end != size:
        raise DamagedFile(f"{path} is damaged: its tensors end at byte {8 + n + end} but the file has {size} bytes "
                          f"({'truncated' if size < 8 + n + end else 'trailing data'})")
    return header


def check_zip(path: str | Path) -> None:
    """A torch.save file (a zip archive) whose directory at the end is readable: DamagedFile otherwise."""
    import zipfile
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with zipfile.ZipFile(path) as zf:
            zf.infolist()
    except (zipfile.BadZipFile, OSError) as err:
        with open(path, "rb") as fh:
            kind = _kind_of(fh.read(8))
        raise DamagedFile(f"{path} is not a readable torch.save file ({path.stat().st_size} bytes; "
                          f"{'truncated or damaged' if kind and kind.startswith('a zip') else kind or err})") from None


SHARDED_METADATA = ".metadata"  # torch.distributed.checkpoint's index of a sharded folder
SHARDED_INFO = "rectflow.json"  # beside it: what a weights file's safetensors header would say


def check_sharded(folder: str | Path) -> None:
    """A torch.distributed.checkpoint weights folder with its index, its shard files (__R_0.distcp) and rectflow's
    metadata, none empty: DamagedFile otherwise (FileNotFoundError when it is not there)."""
    folder = Path(folder)
    if not (folder / SHARDED_METADATA).is_file():
        raise FileNotFoundError(f"{folder} is not a sharded checkpoint folder (no {SHARDED_METADATA})")
    for f in [folder / SHARDED_METADATA, *folder.glob("*.distcp")]:
        if f.stat().st_size == 0:
            raise DamagedFile(f"{f} is empty (an interrupted write)")
    if not any(folder.glob("*.distcp")):
        raise DamagedFile(f"{folder} holds no shard files (*.distcp)")
    try:
        info = json.loads((folder / SHARDED_INFO).read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DamagedFile(f"{folder / SHARDED_INFO}: unreadable ({err})") from None
    if not isinstance(info, dict):
        raise DamagedFile(f"{folder / SHARDED_INFO}: expected a JSON object")


def safetensors_metadata(path: str | Path) -> dict[str, str]:
    """The header metadata of a .safetensors file (checked as check_safetensors does), or of a sharded weights
    folder (its rectflow.json); {} for other folders and files."""
    path = Path(path)
    if path.is_dir() and (path / SHARDED_INFO).is_file():
        check_sharded(path)
        return json.loads((path / SHARDED_INFO).read_text())
    if path.suffix.lower() != ".safetensors" or path.is_dir():
        return {}
    return check_safetensors(path).get("__metadata__") or {}
