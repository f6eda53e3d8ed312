"""Files that are either whole or absent: atomic writes, and checksums.

Long jobs (labelling, training, MD) are killed; a reader must then see the old file or the new one, never a
part. Every write goes to a hidden temporary beside its destination (named after it and this process, so a
restarted job recognises its own leftovers), is flushed to disk and renamed over the destination.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from typing import IO, Any, Callable, Iterator

TEMPORARY_MARK = ".tmp-"


def temporary_path(path: str | os.PathLike) -> str:
    """Where `path` is written before it is renamed into place."""
    directory, name = os.path.split(os.path.abspath(path))
    return os.path.join(directory, f".{name}{TEMPORARY_MARK}{os.getpid()}")


def is_temporary(name: str) -> bool:
    return name.startswith(".") and TEMPORARY_MARK in name


def fsync_directory(path: str | os.PathLike) -> None:
    """Make a rename in `path` durable (the directory entry, not only the file's bytes)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replaced(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path to write; on success it replaces `path` durably, on failure it is removed."""
    path = os.fspath(path)
    tmp = temporary_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    fsync_directory(os.path.dirname(os.path.abspath(path)))


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with replaced(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode())


def write_json_atomic(path: str | os.PathLike, data: Any, indent: int | None = 2) -> None:
    """Strict JSON only: NaN and infinity are not JSON (other readers refuse them), so they are refused here."""
    try:
        text = json.dumps(data, indent=indent, ensure_ascii=False, allow_nan=False)
    except ValueError as err:
        raise ValueError(f"{path}: not written, {err} (NaN or infinity)") from None
    write_text_atomic(path, text)


def update_json(path: str | os.PathLike, update: Callable[[Any], Any]) -> Any:
    """Replace the JSON at `path` by `update(old)` (old is None where there is no file yet), written atomically
    under an exclusive lock on `path`.lock: several processes of one job (students trained side by side, stability
    reports of several systems) add to one results file without losing each other's entries. Returns the new data."""
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        old = None
        if os.path.isfile(path):
            with open(path) as f:
                old = json.load(f)
        new = update(old)
        write_json_atomic(path, new)
    return new


def lock_exclusively(path: str | os.PathLike) -> IO | None:
    """An exclusive lock on the file `path` (created if missing): the open file, which holds it until closed, or
    None while another process holds it. The kernel releases it when its process dies, even by kill -9, so a
    killed job never leaves a stale lock behind."""
    lock = open(path, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return None
    return lock


def sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
