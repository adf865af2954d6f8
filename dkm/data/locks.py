"""One writer per store: an advisory lock beside the store, held while a process writes it.

The lock is ``.<name>.lock`` next to the store (so it exists before the store does, and
outlives the atomic rename of a dataset store). It is an ``flock`` on that file: the kernel
releases it when the holder exits, however it exits, so a lock left by a dead process is
never in the way. The file also records who holds it (host, pid, start time, what for), which
is what a second writer is told.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

from dkm.data.store import StoreError

__all__ = ["StoreLocked", "StoreUnwritable", "lock_path", "store_lock"]

log = logging.getLogger("dkm")


class StoreLocked(StoreError):
    """Another process is writing the store."""


class StoreUnwritable(StoreError):
    """The store's directory cannot be written (no such parent, no permission)."""


def lock_path(path: str | os.PathLike) -> Path:
    """The lock file of the store at ``path``."""
    path = Path(path)
    return path.with_name(f".{path.name}.lock")


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
    except (OSError, ValueError):
        return "another process"
    since = datetime.fromtimestamp(info.get("started", 0), UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return (
        f"{info.get('purpose', 'dkm')} (pid {info.get('pid', '?')} on {info.get('host', '?')}, "
        f"since {since})"
    )


@contextlib.contextmanager
def store_lock(
    path: str | os.PathLike, *, purpose: str, wait: float = 0.0, poll: float = 0.5
) -> Iterator[None]:
    """Hold the write lock of the store at ``path`` for the ``with`` block.

    Parameters
    ----------
    path : path-like
        The store (it need not exist yet).
    purpose : str
        What the holder does, for the message a second writer gets (``"dkm run job.yaml"``).
    wait : float, default 0
        Seconds to wait for the holder to finish before giving up; 0 fails at once.
    poll : float, default 0.5
        Seconds between attempts while waiting.

    Raises
    ------
    StoreLocked
        Another live process holds the lock (after ``wait`` seconds).
    """
    lock = lock_path(path)
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise StoreUnwritable(
            f"{path}: cannot write there ({err.strerror or type(err).__name__}: {lock.parent})"
        ) from None
    try:
        deadline = time.monotonic() + wait
        logged = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StoreLocked(f"{path}: in use by {_holder(fd)}") from None
                if not logged:
                    log.info("%s: waiting for %s", path, _holder(fd))
                    logged = True
                time.sleep(poll)
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": time.time(),
            "purpose": purpose,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
