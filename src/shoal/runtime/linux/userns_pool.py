"""Sandboxes' user namespace pairs (``budgets.make_userns``) made ahead of time.

Making one costs about 10 ms on the create path (a fork, two unshares, maps and limits written),
which is a quarter of create → first result. They are all alike (the same uid range, the same
shares), so each process that creates sandboxes keeps a few ready, made by a background thread as soon
as one is taken, and a create takes one in microseconds. The forks happen in a small helper process
(``userns_maker``), never in the daemon itself: forking the daemon stalls it for as long as copying its
page tables takes, which made an immediate refill cost the creates around it more than it saved.

Each is an nsfs bind mount in ``<run>/userns/``, named ``<pid>-<start>-<n>`` after the process that made
it. A sandbox's bundle holds a symlink ``userns`` to the one it took; destroy unmounts and removes
that file. ``sweep`` removes what dead processes left: files no live bundle points to whose maker is
gone.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
import time
import weakref
from pathlib import Path

from shoal import refill
from shoal.host_processes import process_start_time
from shoal.runtime.linux import mounts
from shoal.runtime.linux.userns_maker import UsernsMaker

POOL_SIZE = 8  # a burst (a fork of several children) takes them without waiting for the maker
_pools: weakref.WeakSet[UsernsPool] = weakref.WeakSet()  # for close_all
_numbers = itertools.count()  # one sequence per process: several pools (instances) may share a directory name
#: Seconds after the last claim before refilling. Zero since the forks moved to ``userns_maker``.
REFILL_DELAY = 0.0


class UsernsPool:
    """Ready user namespace pairs of this process, under ``directory``."""

    def __init__(self, directory: Path, uid_base: int, uid_count: int, size: int = POOL_SIZE) -> None:
        self.directory, self.uid_base, self.uid_count, self.size = directory, uid_base, uid_count, size
        self._ready: collections.deque[Path] = collections.deque()
        self._cv = threading.Condition()
        self._last_claim = 0.0
        self._thread: threading.Thread | None = None
        self._closed = False
        self._me = f"{os.getpid()}-{process_start_time(os.getpid())}"
        self._maker = UsernsMaker(uid_base, uid_count)
        _pools.add(self)

    def _make(self) -> Path:
        self.directory.mkdir(exist_ok=True)  # not its parents: a removed run directory stays removed
        path = self.directory / f"{self._me}-{next(_numbers)}"
        self._maker.make(path)
        return path

    def full(self) -> bool:
        """Whether every namespace pair this pool keeps is made (``shoal bench`` waits for it)."""
        with self._cv:
            return len(self._ready) >= self.size

    def claim(self) -> Path:
        """A ready namespace file (made now if none is ready); the caller owns it from here on."""
        with self._cv:
            self._last_claim = time.monotonic()
            path = self._ready.popleft() if self._ready else None
            if self._thread is None and self.size > 0:
                self._thread = threading.Thread(target=self._fill, daemon=True, name="shoal-userns-pool")
                self._thread.start()
            self._cv.notify_all()
        return path if path is not None else self._make()

    def _fill(self) -> None:
        while True:
            with self._cv:
                while not self._closed and (len(self._ready) >= self.size
                                            or time.monotonic() - self._last_claim < REFILL_DELAY):
                    wait = REFILL_DELAY - (time.monotonic() - self._last_claim)
                    self._cv.wait(timeout=max(wait, 0.05) if len(self._ready) < self.size else None)
                if self._closed:
                    return
            refill.wait_between_creates()  # never beside a create of this process (shoal/refill.py)
            try:
                path = self._make()
            except OSError:
                time.sleep(1)  # the next create makes its own; try again later
                continue
            with self._cv:
                if self._closed:
                    release(path)
                    return
                self._ready.append(path)

    def close(self) -> None:
        """Remove this process's ready namespaces (at exit)."""
        with self._cv:
            self._closed = True
            ready, self._ready = list(self._ready), collections.deque()
            self._cv.notify_all()
        for path in ready:
            release(path)
        self._maker.close()

    def sweep(self, in_use: set[Path]) -> list[Path]:
        """Remove namespace files that no bundle uses and whose maker is gone."""
        removed = []
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return removed
        for entry in entries:
            path = Path(entry.path)
            if path in in_use or entry.name.startswith(self._me + "-"):
                continue  # used by a sandbox, or this process's own (ready, being made, just claimed)
            pid, _, rest = entry.name.partition("-")
            if pid.isdigit() and str(process_start_time(int(pid))) == rest.partition("-")[0]:
                continue  # another live process's pool
            release(path)
            removed.append(path)
        return removed


def close_all() -> None:
    """Close every pool of this process (a test run's end, before its run directory goes)."""
    for pool in list(_pools):
        pool.close()


def release(path: Path) -> None:
    """Unmount and remove one namespace file (idempotent)."""
    mounts.umount(path, lazy=True)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
