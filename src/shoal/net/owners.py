"""Who owns each slot number: the files ``<run>/net/slots/<n>``, changed only under ``<run>/net/lock``.

Slot numbers are shared by every process of an instance (the daemon, a CLI, a test's second engine), and
a number is free for the taking the moment its file is gone. So the file is the one truth of ownership,
and two rules follow (breaking them handed a sandbox a slot whose namespace another thread had just
removed: ``open .../net/ns/2: No such file or directory`` at ``crun run``):

* Only the holder named in a slot's file touches the slot's kernel objects (namespace, sysfs, veth).
* Nobody acts on a slot number read earlier: every change of a file is a compare-and-swap under the lock
  (``take``), which checks that the file still names the owner the caller believes in. A second release
  of one sandbox, a reconcile that read the files a moment ago, a forked child with its parent's pool:
  each finds the file changed and does nothing.

Owners, as JSON: ``{"pool": [pid, start]}`` (ready in that process' pool), ``{"sandbox": id,
"internet": bool}`` (claimed), ``{"freeing": [pid, start]}`` (being torn down by that process; the number
stays taken until its kernel objects are gone, then the file is unlinked). A process is named by pid and
start time, so a recycled pid never passes for a dead owner.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from shoal.host_processes import process_start_time as start_time

#: What ``read`` returns for a slot with no file (distinct from ``None``: a file that is empty or garbage).
MISSING: dict = {"missing": True}


def me() -> list:
    """This process, as owner files name it (computed per call: a forked child is another process)."""
    pid = os.getpid()
    return [pid, start_time(pid)]


def pool_owner() -> dict:
    return {"pool": me()}


def freeing_owner() -> dict:
    return {"freeing": me()}


def sandbox_owner(sandbox_id: str, internet: bool) -> dict:
    return {"sandbox": sandbox_id, "internet": bool(internet)}


def process_alive(who: object) -> bool:
    """Whether ``[pid, start]`` (as read from a file, so untyped) is a process that still runs."""
    if not isinstance(who, list) or len(who) != 2 or not isinstance(who[0], int) or isinstance(who[0], bool):
        return False
    return start_time(who[0]) == who[1]


class OwnerFiles:
    """The slot files and the instance lock of one ``<run>/net`` directory."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.dir = root / "slots"

    @contextmanager
    def locked(self) -> Iterator[None]:
        """The instance's network lock (flock: held per open file, so threads and processes both wait)."""
        try:
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:  # the run directory was removed (a test run's end): nobody to wait for
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def path(self, slot: int) -> Path:
        return self.dir / str(slot)

    def read(self, slot: int) -> dict | None:
        """The slot's owner; ``MISSING`` without a file, None for an empty or unreadable one."""
        try:
            text = self.path(slot).read_text()
        except FileNotFoundError:
            return MISSING
        except OSError:
            return None
        try:
            data = json.loads(text or "null")
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def read_all(self) -> dict[int, dict | None]:
        out: dict[int, dict | None] = {}
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            return out
        for entry in entries:
            if entry.name.isdigit():
                data = self.read(int(entry.name))
                if data is not MISSING:
                    out[int(entry.name)] = data
        return out

    def reserve(self, max_slot: int, owner: dict) -> int | None:
        """The lowest free number, now ``owner``'s (O_EXCL: a file left by anyone keeps its number taken);
        None when every number is taken. Caller holds the lock."""
        used = set(self.read_all())
        for slot in range(max_slot + 1):
            if slot in used:
                continue
            try:
                fd = os.open(self.path(slot), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue  # appeared since the listing (a file being written was unreadable then)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(owner))
            return slot
        return None

    def write(self, slot: int, owner: dict) -> None:
        """Replace the slot's owner atomically (readers see the old or the new file, never a half).
        Caller holds the lock and has checked the current owner."""
        tmp = self.dir / f".{slot}.tmp"
        tmp.write_text(json.dumps(owner))
        os.replace(tmp, self.path(slot))

    def take(self, slot: int, expect: Callable[[dict | None], bool]) -> dict | None:
        """If the slot's owner passes ``expect``, make this process its ``freeing`` owner and return the
        owner it had; otherwise None and nothing changes. Caller holds the lock."""
        data = self.read(slot)
        if data is MISSING or not expect(data):
            return None
        self.write(slot, freeing_owner())
        return data if data is not None else {}

    def drop(self, slot: int) -> bool:
        """Unlink the slot's file if this process is freeing it: the number is free again. Caller holds
        the lock."""
        if self.read(slot) != freeing_owner():
            return False
        try:
            os.unlink(self.path(slot))
        except FileNotFoundError:
            return False
        return True
