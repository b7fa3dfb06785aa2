"""File locks (flock) shared by processes on one host: the CLI, the daemon and test runs.

One helper for every lock file Shoal keeps (template builds and mounts, the blob cache, reconcile,
pause/resume): each call opens its own descriptor, so the lock also orders threads of one process,
and closing it is the only way to release it, so an exception or a crash can never leave it held.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def file_lock(path: Path, *, exclusive: bool = True, wait: bool = True) -> Iterator[bool]:
    """Hold an flock on ``path`` (made 0600 if missing). Yields True when held; with ``wait=False``,
    yields False at once if another holder has it (the body then runs without the lock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)
