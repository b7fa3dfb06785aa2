"""Snapshots: a sandbox's files frozen into an immutable layer that new sandboxes start from.

A snapshot is the sandbox's writable layer (what it changed on top of its template, whiteouts and
opaque directories included) made into a compressed EROFS image while every process of the sandbox
is frozen (cgroup freezer), so the image is one instant of the tree. A sandbox created from it gets
an overlay with several lowers: ``snapshot:template``; a snapshot of *that* sandbox stacks on the
first one (``snap2:snap1:template``, ``parent`` in the record). Memory is never part of it.

Deletion is refused (409 ``conflict``) while a sandbox (in any state) or a stacked snapshot uses it:
refusing is the honest answer, since a deferred delete would keep disk that the caller believes
freed. Internal snapshots (``fork``) are the exception: nobody can name them, and they go as soon as
the last sandbox made from them does (``collect``, also at every reconcile).

Crash safety: the snapshot holds the engine's transition lock (the reconcile lock, shared) for the
whole freeze; the image directory appears by one rename and its row is written after it; reconcile
(which runs only when no snapshot is in flight) thaws RUNNING sandboxes left frozen, removes temp
directories, images without a row and rows without an image.
"""

from __future__ import annotations

import os
import re
import secrets
import string
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from shoal.engine.keys import ApiKey
from shoal.engine.models import PauseMode, SandboxState
from shoal.engine.store import SnapshotStore
from shoal.errors import Conflict, InvalidRequest, InvalidTransition, NotFound, QuotaExceeded, ShoalError
from shoal.storage.snapshots import SnapshotImages

if TYPE_CHECKING:
    from shoal.engine.engine import Engine

ID_PREFIX = "snap"
_ID_RE = re.compile(r"snap[a-z0-9]{12}")
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
#: Snapshots stacked on snapshots: overlayfs takes hundreds of lowers, but each is a mount and a lookup.
MAX_DEPTH = 32
#: Named or unnamed snapshots one API key may keep (each can hold up to its sandbox's disk size).
MAX_PER_KEY = int(os.environ.get("SHOAL_MAX_SNAPSHOTS_PER_KEY", "100"))


def new_snapshot_id() -> str:
    alphabet = string.ascii_lowercase + string.digits
    return ID_PREFIX + "".join(secrets.choice(alphabet) for _ in range(12))


def valid_snapshot_id(value: str) -> bool:
    return bool(_ID_RE.fullmatch(value or ""))


@dataclass
class SnapshotRecord:
    """One snapshot: what it stacks on (``template`` at ``template_digest``, ``parent`` snapshot)."""

    id: str
    name: str | None
    api_key: str | None
    template: str
    template_digest: str
    parent: str | None
    source_sandbox: str | None
    created_at: float
    size_bytes: int
    internal: bool = False

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("api_key")
        return d


class Snapshots:
    """The engine's snapshots (``engine.snapshots``): create, get, list, delete, the layer stack."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.images = SnapshotImages(engine.settings)
        self.store = SnapshotStore(engine.settings.db_path)
        self._lock = threading.Lock()

    # --- reading ---------------------------------------------------------------------------------
    @staticmethod
    def _record(row: dict) -> SnapshotRecord:
        return SnapshotRecord(**{**row, "internal": bool(row["internal"])})

    def get(self, ref: str, api_key: ApiKey | None = None, *, internal: bool = False) -> SnapshotRecord:
        """By id or name; another key's snapshot (and an internal one, unless asked) does not exist."""
        row = self.store.get(ref) if valid_snapshot_id(ref) else None
        if row is None and NAME_RE.fullmatch(ref or ""):
            row = next((r for r in self.store.all() if r["name"] == ref
                        and (api_key is None or r["api_key"] == api_key.id)), None)
        if (row is None or (api_key is not None and row["api_key"] != api_key.id)
                or (row["internal"] and not internal)):
            raise NotFound(f"snapshot {ref} does not exist")
        return self._record(row)

    def list(self, api_key: ApiKey | None = None, *, sandbox_id: str | None = None,
             name: str | None = None) -> list[SnapshotRecord]:
        """The key's snapshots (internal ones never), optionally of one sandbox or with one name."""
        out = []
        for row in self.store.all():
            if row["internal"] or (api_key is not None and row["api_key"] != api_key.id):
                continue
            if sandbox_id is not None and row["source_sandbox"] != sandbox_id:
                continue
            if name is not None and row["name"] != name and row["id"] != name:
                continue
            out.append(self._record(row))
        return out

    def users(self, snapshot_id: str) -> list[str]:
        """Sandboxes (any state) and snapshots that stack on ``snapshot_id``."""
        return ([r.id for r in self.engine.store.all() if r.snapshot == snapshot_id]
                + [r["id"] for r in self.store.all() if r["parent"] == snapshot_id])

    def lowers(self, snapshot_id: str) -> tuple[Path, ...]:
        """The mounted layers of ``snapshot_id`` and its parents, top first (the template is not included)."""
        chain: list[Path] = []
        current: str | None = snapshot_id
        while current is not None:
            row = self.store.get(current)
            if row is None or len(chain) > MAX_DEPTH:
                raise NotFound(f"snapshot {current} (a layer of {snapshot_id}) does not exist")
            chain.append(self.images.mount(current))
            current = row["parent"]
        return tuple(chain)

    def check_template(self, snap: SnapshotRecord) -> None:
        """A snapshot holds only changes to one build of its template: a rebuilt template is refused."""
        info = self.engine.templates.get(snap.template)
        if not info.built or info.digest != snap.template_digest:
            raise Conflict(f"template '{snap.template}' changed since snapshot {snap.id} was taken; "
                           "the snapshot can no longer be used")

    # --- creating --------------------------------------------------------------------------------
    def create(self, sandbox_id: str, name: str | None = None, api_key: ApiKey | None = None, *,
               internal: bool = False, take_name: bool = False) -> SnapshotRecord:
        """Freeze the sandbox (RUNNING; a memory-paused one is frozen already), write its layer as a
        snapshot, thaw it. ``name`` is unique per key: taken → 409, or with ``take_name`` (E2B: a new
        build of the same named snapshot) the older snapshot loses it."""
        if name is not None and not NAME_RE.fullmatch(name):
            raise InvalidRequest("a snapshot name is 1-63 letters, digits, '.', '_' or '-', starting with a "
                                 "letter or digit")
        eng = self.engine
        with eng._transition(sandbox_id):
            rec = eng.get(sandbox_id, api_key)
            if rec.state is SandboxState.RUNNING:
                freeze = True
            elif rec.state is SandboxState.PAUSED and rec.pause_mode != PauseMode.FILESYSTEM.value:
                freeze = False
            else:
                what = "paused to its filesystem" if rec.state is SandboxState.PAUSED else rec.state.value
                raise InvalidTransition(f"{what} (resume it first)" if rec.state is SandboxState.PAUSED else what,
                                        "snapshot", sandbox_id)
            if rec.snapshot is not None and self._depth(rec.snapshot) >= MAX_DEPTH:
                raise Conflict(f"sandbox {sandbox_id} already stacks {MAX_DEPTH} snapshots; make a template of "
                               "its snapshot first")
            info = eng.templates.get(rec.template)
            snap = SnapshotRecord(id=new_snapshot_id(), name=name, api_key=api_key.id if api_key else rec.api_key,
                                  template=rec.template, template_digest=info.digest, parent=rec.snapshot,
                                  source_sandbox=rec.id, created_at=time.time(), size_bytes=0, internal=internal)
            with self._lock:
                self._check_room(snap, take_name)
            if freeze:
                eng.runtime.pause(rec.id)  # crun waits until every task is frozen
            try:
                snap.size_bytes = self.images.write(eng.runtime.upper_dir(rec.id), snap.id, snap.to_dict(),
                                                    max_bytes=rec.disk_mb * 1024 * 1024)  # sparse files copy whole
            finally:
                if freeze:
                    eng.runtime.thaw(rec.id)
            with self._lock:
                if name is not None:
                    for row in self.store.all():
                        if row["name"] == name and row["api_key"] == snap.api_key and take_name:
                            self.store.rename(row["id"], None)
                self.store.put({**asdict(snap), "internal": int(snap.internal)})
        return snap

    def _depth(self, snapshot_id: str) -> int:
        depth, current = 0, self.store.get(snapshot_id)
        while current is not None and depth <= MAX_DEPTH:
            depth += 1
            current = self.store.get(current["parent"]) if current["parent"] else None
        return depth

    def _check_room(self, snap: SnapshotRecord, take_name: bool) -> None:
        mine = [r for r in self.store.all() if r["api_key"] == snap.api_key and not r["internal"]]
        if not snap.internal and len(mine) >= MAX_PER_KEY:
            raise QuotaExceeded(f"an API key may keep at most {MAX_PER_KEY} snapshots; delete some first")
        if snap.name is not None and not take_name and any(r["name"] == snap.name for r in mine):
            raise Conflict(f"a snapshot named {snap.name!r} exists already")

    # --- deleting --------------------------------------------------------------------------------
    def delete(self, ref: str, api_key: ApiKey | None = None) -> None:
        """Delete a snapshot: 404 if it does not exist, 409 while a sandbox or a snapshot uses it."""
        snap = self.get(ref, api_key)
        with self._lock:
            users = self.users(snap.id)
            if users:
                raise Conflict(f"snapshot {snap.id} is in use by {', '.join(users[:5])}"
                               f"{' and more' if len(users) > 5 else ''}; delete those first")
            self._remove(snap.id)

    def _remove(self, snapshot_id: str) -> None:
        self.images.remove(snapshot_id)  # Conflict if an overlay still stacks on it
        self.store.delete(snapshot_id)

    def collect(self, snapshot_id: str | None) -> None:
        """Delete ``snapshot_id`` if it is internal (a fork's) and nothing uses it; then its parent likewise."""
        while snapshot_id is not None:
            with self._lock:
                row = self.store.get(snapshot_id)
                if row is None or not row["internal"] or self.users(snapshot_id):
                    return
                try:
                    self._remove(snapshot_id)
                except (ShoalError, OSError):
                    return  # still mounted under an overlay: the next reconcile tries again
            snapshot_id = row["parent"]

    # --- recovery --------------------------------------------------------------------------------
    def reconcile(self) -> None:
        """After a crash (under the exclusive reconcile lock, so no snapshot is in flight): thaw RUNNING
        sandboxes a snapshot left frozen, drop half-written and unrecorded images, records without an
        image, and internal snapshots nobody uses."""
        eng = self.engine
        for rec in eng.store.all():
            if rec.state is SandboxState.RUNNING:
                eng.runtime.thaw(rec.id)
        self.images.sweep_temp()
        rows = {r["id"]: r for r in self.store.all()}
        for sid in self.images.on_disk() - set(rows):
            try:
                self.images.remove(sid)
            except (ShoalError, OSError):
                pass
        for sid, row in rows.items():
            if not self.images.image(sid).is_file():
                self.store.delete(sid)
            elif row["internal"]:
                self.collect(sid)
