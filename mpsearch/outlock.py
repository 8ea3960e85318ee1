"""One writer per output directory: OUT/.mpsearch.lock names the process that writes OUT.

A search, compare or verify takes the lock before it writes OUT (result.json, the study, the
report) and removes it when it ends. Another process that wants OUT meanwhile is refused with
an OutputDirError naming the owner (command, pid, host, start time). A lock whose process is gone
(killed, crashed: its pid no longer runs on this host) is stale and taken over. A lock written by
another host cannot be checked from here: it is refused, saying which file to remove if that
process is gone. Within one process the lock is re-entrant (compare runs a search in its OUT).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import time
from pathlib import Path
from typing import Self

from mpsearch.errors import OutputDirError

LOCK_NAME = ".mpsearch.lock"
_held: dict[Path, int] = {}  # directories this process holds, with how many holders


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it runs
        return True
    return True


def _start_ticks(pid: int) -> str:
    """When process `pid` started (clock ticks since boot, from /proc; "" where there is none):
    with the pid, it names one process even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat[stat.rindex(")") + 2:].split()[19]  # field 22, after the (command) that may hold spaces


def this_process() -> str:
    """This process, as `host:pid:start` (see process_gone)."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def process_gone(token: str) -> bool:
    """Whether the process a `this_process()` token names has ended. Only a process of this host
    can be checked: one of another host (or a malformed token) is not known to be gone."""
    try:
        host, pid, start = token.rsplit(":", 2)
        pid_n = int(pid)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    if not _alive(pid_n):
        return True
    return bool(start) and _start_ticks(pid_n) not in ("", start)  # the pid now names another process


def _owner(path: Path) -> dict | None:
    """The lock's owner; None when the file is gone. A half-written lock counts as a live owner
    for a few seconds (its writer is between create and write), then as stale."""
    try:
        text = path.read_text()
        st = path.stat()
    except FileNotFoundError:
        return None
    try:
        owner = json.loads(text)
        if isinstance(owner, dict) and isinstance(owner.get("pid"), int):
            return owner
    except ValueError:
        pass
    fresh = time.time() - st.st_mtime < 10
    return {"pid": "?", "host": socket.gethostname(), "command": "an mpsearch starting", "started": "",
            "unreadable": True, "fresh": fresh}


def _stale(owner: dict) -> bool:
    """Whether a lock (not held by this process's OutputLocks) can be taken over."""
    if owner.get("unreadable"):
        return not owner["fresh"]
    if owner.get("host") != socket.gethostname():
        return False
    if owner["pid"] == os.getpid():  # this process left it behind (an error before release)
        return True
    return not _alive(owner["pid"])


class OutputLock:
    """OUT's lock, held from acquire() to release() (or as a context manager)."""

    def __init__(self, out: str | os.PathLike, command: str) -> None:
        self.dir = Path(out).resolve()
        self.path = self.dir / LOCK_NAME
        self.command = command
        self.held = False

    def acquire(self) -> Self:
        if self.dir in _held:
            _held[self.dir] += 1
            self.held = True
            return self
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
              "started": _dt.datetime.now().isoformat(timespec="seconds")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _owner(self.path)
                if owner is None:
                    continue  # removed meanwhile: try again
                if not _stale(owner):
                    raise OutputDirError(self._refusal(owner)) from None
                try:  # a dead process's lock (or one this process left): taken over
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass
                continue
            except OSError as e:
                raise OutputDirError(f"cannot lock output directory {self.dir}: {e.strerror or e}") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            _held[self.dir] = 1
            self.held = True
            return self
        raise OutputDirError(f"cannot lock output directory {self.dir}: {self.path} keeps changing")

    def _refusal(self, owner: dict) -> str:
        since = f", since {owner['started']}" if owner.get("started") else ""
        where = "" if owner.get("host") == socket.gethostname() else (
            f"; it cannot be checked from this host: remove {self.path} if that process is gone")
        return (f"output directory {self.dir} is in use by {owner.get('command', 'mpsearch')} (pid {owner['pid']} on "
                f"{owner.get('host')}{since}): wait for it to end, or give another --out{where}")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        _held[self.dir] -= 1
        if _held[self.dir] > 0:
            return
        del _held[self.dir]
        owner = _owner(self.path)
        if owner is not None and owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> Self:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
