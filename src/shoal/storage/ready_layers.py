"""``disk`` layers mounted ahead of time, so that a create only moves one into its bundle.

Attaching a loop device and mounting a fresh ext4 image costs 10–15 ms of kernel work, which put the
``disk`` layer at a third of create → first result. A fresh layer holds nothing of any sandbox (an
empty filesystem with the layer's own ``upper/`` and ``work/``), so it can be made before anyone asks:
each process that creates sandboxes keeps several mounted under ``<run>/layers-ready/``, and a
create renames the image to the sandbox's name and moves the mount (``MS_MOVE``) onto its bundle,
in well under a millisecond. A background thread mounts the next one as soon as one is taken.

Each ready layer is named ``<pid>-<start>-<n>`` after the process that made it: its image is
``<state>/layers/.ready-<name>.ext4`` (a dot name: ``WritableLayers.existing`` skips it) and its mount
``<run>/layers-ready/<name>``. ``close`` removes a process's own at exit; ``sweep`` (reconcile) removes
what a dead process left.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
import weakref
from pathlib import Path

from shoal import refill
from shoal.host_processes import process_start_time
from shoal.runtime.linux import mounts

#: Mounted layers kept ready of the size asked for last (each holds a loop device and a mount, and < 1 MiB
#: of disk): enough for a fork of several children or a burst of creates without mounting one inline
#: (measured, a fork of 10 after idle time: ~34 ms per child with 10 ready parts of each kind, ~53 with 2-4).
READY = 8
#: ...and of the other size kept ready.
READY_OLDER = 2
#: Sizes kept ready at once: the most recently asked for (the default size almost always).
SIZES = 2
_all: weakref.WeakSet[ReadyLayers] = weakref.WeakSet()
_numbers = itertools.count()


class ReadyLayers:
    """This process's mounted, empty ``disk`` layers, by size."""

    def __init__(self, layers: object, image_dir: Path, mount_dir: Path, uid_base: int) -> None:
        # ``layers`` is the ``WritableLayers`` that makes and mounts images (typed loosely: it imports us)
        self.layers, self.image_dir, self.mount_dir, self.uid_base = layers, image_dir, mount_dir, uid_base
        self._ready: dict[int, collections.deque[str]] = {}
        self._sizes: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._me = f"{os.getpid()}-{process_start_time(os.getpid())}"
        _all.add(self)

    def image(self, name: str) -> Path:
        return self.image_dir / f".ready-{name}.ext4"

    # --- the create path ---------------------------------------------------------------------
    def full(self) -> bool:
        """Whether the layers of the sizes asked for are all mounted (``shoal bench`` waits for it)."""
        with self._cv:
            return self._wanted() is None

    def take(self, size_mb: int, image: Path, target: Path) -> bool:
        """Move a ready layer of ``size_mb`` onto ``target`` with its image renamed to ``image``; False if
        none is ready (the caller mounts a fresh one). Asks for more either way."""
        with self._cv:
            self._sizes[size_mb] = None
            self._sizes.move_to_end(size_mb)
            while len(self._sizes) > SIZES:
                self._sizes.popitem(last=False)
            queue = self._ready.get(size_mb)
            name = queue.popleft() if queue else None
            if self._thread is None:
                self._thread = threading.Thread(target=self._fill, daemon=True, name="shoal-ready-layers")
                self._thread.start()
            self._cv.notify_all()
        if name is None:
            return False
        try:
            os.rename(self.image(name), image)
            mounts.move(self.mount_dir / name, target)
        except OSError:
            self._discard(name, image)
            return False
        _rmdir(self.mount_dir / name)
        return True

    # --- the background side -----------------------------------------------------------------
    def _wanted(self) -> int | None:
        for i, size in enumerate(reversed(self._sizes)):
            if len(self._ready.get(size, ())) < (READY if i == 0 else READY_OLDER):
                return size
        return None

    def _fill(self) -> None:
        while True:
            with self._cv:
                while not self._closed and self._wanted() is None:
                    self._cv.wait()
                if self._closed:
                    return
                size = self._wanted()
            assert size is not None
            refill.wait_between_creates()  # never beside a create of this process (shoal/refill.py)
            try:
                name = self._make(size)
            except Exception:  # noqa: BLE001 - a create mounts its own layer then; try again on the next take
                with self._cv:
                    self._cv.wait(timeout=1)
                continue
            with self._cv:
                if self._closed or size not in self._sizes:
                    self._discard(name)
                    if self._closed:
                        return
                    continue
                self._ready.setdefault(size, collections.deque()).append(name)

    def _make(self, size_mb: int) -> str:
        name = f"{self._me}-{next(_numbers)}"
        image, target = self.image(name), self.mount_dir / name
        self.mount_dir.mkdir(mode=0o700, exist_ok=True)
        target.mkdir(mode=0o700)
        try:
            self.layers.copy_pristine(size_mb, image)  # type: ignore[attr-defined]
            self.layers.mount_image(image, target)  # type: ignore[attr-defined]
            prepare(target, self.uid_base)
        except BaseException:
            self._discard(name)
            raise
        return name

    def _discard(self, name: str, image: Path | None = None) -> None:
        target = self.mount_dir / name
        try:
            mounts.umount(target, lazy=True)
        except OSError:
            pass
        _rmdir(target)
        for path in (self.image(name), image):
            if path is not None and path.name.startswith(".ready-"):
                path.unlink(missing_ok=True)

    def close(self) -> None:
        """Remove this process's ready layers (at exit)."""
        with self._cv:
            self._closed = True
            names = [n for q in self._ready.values() for n in q]
            self._ready.clear()
            self._cv.notify_all()
        for name in names:
            self._discard(name)

    def sweep(self) -> list[str]:
        """Remove ready layers whose maker is gone (reconcile)."""
        removed = []
        try:
            entries = [e.name for e in os.scandir(self.mount_dir)]
        except OSError:
            entries = []
        try:
            entries += [e.name[len(".ready-"):-len(".ext4")] for e in os.scandir(self.image_dir)
                        if e.name.startswith(".ready-") and e.name.endswith(".ext4")]
        except OSError:
            pass
        for name in sorted(set(entries)):
            pid, _, rest = name.partition("-")
            if name.startswith(self._me + "-"):
                continue
            if pid.isdigit() and str(process_start_time(int(pid))) == rest.partition("-")[0]:
                continue  # another live process's
            self._discard(name)
            removed.append(name)
        return removed


def prepare(target: Path, uid_base: int) -> None:
    """The layer's own top level: ``upper/`` (with ``etc/``) and ``work/``, owned by sandbox root."""
    for d in ("upper", "work", "upper/etc"):
        (target / d).mkdir(exist_ok=True)
        os.chown(target / d, uid_base, uid_base)


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def close_all() -> None:
    """Close every ready-layer pool of this process (a test run's end, before its directories go)."""
    for pool in list(_all):
        pool.close()
