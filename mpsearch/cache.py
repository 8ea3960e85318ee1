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
    An OSError names `path` (not the temporary file beside it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # name the file the caller asked for, not the temporary one
        tmp.unlink(missing_ok=True)
        raise type(e)(e.errno, e.strerror, str(path)) from None
