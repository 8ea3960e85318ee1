"""Where mpsearch keeps what it builds once: trained models, datasets, weights, caches."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """$MPSEARCH_CACHE_DIR, else $XDG_CACHE_HOME/mpsearch, else ~/.cache/mpsearch (created)."""
    root = os.environ.get("MPSEARCH_CACHE_DIR")
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mpsearch"
    path = base.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_write_bytes(path: str | os.PathLike, data: bytes, durable: bool = True) -> None:
    """Write a file so that readers see the old or the new content, never a partial one.
    durable: also survive a power cut (fsync; a killed process loses nothing either way).
    On any failure (a full disk, a read-only directory, an interrupt) the temporary file beside
    `path` is removed and the old content stays; an OSError names `path`, not the temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # pragma: no cover - a directory that vanished meanwhile
            pass
        if isinstance(e, OSError):  # name the file the caller asked for, not the temporary one
            raise type(e)(e.errno, e.strerror, str(path)) from None
        raise


def append_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Append `data` to the file at `path` whole or not at all: a write that fails part-way (a
    full disk, the file size limit) is cut off again, so a log of lines never keeps a partial
    one that the next append would run into. An OSError names `path`. Appenders in several
    processes must hold a lock around it (the end of the file is read first)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.lseek(fd, 0, os.SEEK_END)
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(fd, view):]
        except BaseException as e:
            os.ftruncate(fd, start)  # shrinking needs no space
            if isinstance(e, OSError):
                raise type(e)(e.errno, e.strerror, str(path)) from None
            raise
    finally:
        os.close(fd)
