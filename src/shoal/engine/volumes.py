"""Named volumes: records, per-key names, who uses which, and when the host mounts them.

A volume belongs to the API key that made it: its name is unique per key, and another key can
neither see it nor mount it (it does not exist for them: 404, like another key's sandbox). Inside,
a volume is known by an id; its host resources are named ``shoal-<instance>-vol-<id>``
(``storage.volumes``), so names never reach a path on the host.

A sandbox's record lists the volumes it mounts (``[{id, name, path, read_only}]``), written (under
the volumes lock) before any host resource exists: ``rm`` reads the records under the same lock, so
a volume is never removed while a sandbox that uses it is being made, runs, is paused or stopping.
The host mount is made when a sandbox that uses it starts, and undone once no live sandbox (being
made, running, frozen or being stopped) uses it; ``reconcile`` repairs both after a crash.
"""

from __future__ import annotations

import os
import posixpath
import re
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from shoal.engine.keys import ApiKey
from shoal.engine.models import PauseMode, SandboxRecord, SandboxState
from shoal.engine.store import Store, connect_private
from shoal.errors import Conflict, InvalidRequest, NotFound, QuotaExceeded, ShoalError
from shoal.locks import file_lock
from shoal.settings import Settings
from shoal.storage.volumes import VolumeImages

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
#: Mount points a volume may not cover or sit under: the kernel's and the agent's.
FORBIDDEN_PATHS = ("/proc", "/sys", "/dev", "/.shoal")
DEFAULT_SIZE_MB = 1024
MIN_SIZE_MB, MAX_SIZE_MB = 16, 1024 * 1024
MAX_MOUNTS = 16
#: Volumes one API key may keep: each is an image on the host's disk (16 MiB of ext4 metadata for 1 TiB).
MAX_PER_KEY = int(os.environ.get("SHOAL_MAX_VOLUMES_PER_KEY", "100"))
_SCHEMA = """
CREATE TABLE IF NOT EXISTS volumes (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    size_mb INTEGER NOT NULL,
    created_at REAL NOT NULL,
    UNIQUE (owner, name)
);
"""


@dataclass
class VolumeRecord:
    id: str
    name: str
    owner: str
    size_mb: int
    created_at: float

    def to_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "size_mb": self.size_mb, "created_at": self.created_at}


def check_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidRequest(f"a volume name is 1-63 letters, digits, '.', '_' or '-' (starting with a letter or "
                             f"digit), not {name!r}")
    return name


def check_mount_path(path: object) -> str:
    """An absolute, normalised path that is not ``/`` and does not cover or sit under a kernel or agent
    mount (``/proc``, ``/sys``, ``/dev``, ``/.shoal``)."""
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path or len(path) > 1024:
        raise InvalidRequest(f"a volume mount path must be absolute, not {path!r}")
    if ".." in path.split("/"):
        raise InvalidRequest(f"a volume mount path may not contain '..': {path!r}")
    norm = posixpath.normpath(path)
    if norm.startswith("//"):
        norm = "/" + norm.lstrip("/")
    if norm == "/":
        raise InvalidRequest("a volume cannot be mounted over / (the sandbox's root)")
    for bad in FORBIDDEN_PATHS:
        if norm == bad or norm.startswith(bad + "/"):
            raise InvalidRequest(f"a volume cannot be mounted at {norm} (over or under {bad})")
    return norm


def _owner(api_key: ApiKey | None) -> str:
    return api_key.id if api_key is not None else ""


def _live(rec: SandboxRecord) -> bool:
    """True while the sandbox may hold its volumes' mounts (its processes exist or are being made/stopped)."""
    if rec.state is SandboxState.PAUSED:
        return rec.pause_mode != PauseMode.FILESYSTEM.value
    return rec.state in (SandboxState.CREATING, SandboxState.RUNNING, SandboxState.STOPPING)


class Volumes:
    """The volumes of one Shoal instance (shared by its processes through the store and a file lock)."""

    def __init__(self, settings: Settings, sandboxes: Store) -> None:
        self.settings, self.sandboxes = settings, sandboxes
        self.images = VolumeImages(settings)
        self._db = connect_private(settings.db_path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Orders every volume decision across processes: create/rm, a sandbox's record naming volumes,
        mounting and unmounting."""
        with file_lock(self.settings.state_dir / "volumes.lock"):
            yield

    # --- records -----------------------------------------------------------------------------
    def _rows(self, where: str = "", args: tuple = ()) -> list[VolumeRecord]:
        rows = self._db.execute(f"SELECT id, owner, name, size_mb, created_at FROM volumes {where} "
                                "ORDER BY created_at", args).fetchall()
        return [VolumeRecord(id=r[0], owner=r[1], name=r[2], size_mb=r[3], created_at=r[4]) for r in rows]

    def list(self, api_key: ApiKey | None = None) -> list[VolumeRecord]:
        return self._rows("WHERE owner=?", (_owner(api_key),))

    def get(self, name: str, api_key: ApiKey | None = None) -> VolumeRecord:
        """The key's volume called ``name`` (or with that id: E2B addresses volumes by id)."""
        found = self._rows("WHERE owner=? AND (name=? OR id=?)", (_owner(api_key), name, name))
        if not found:
            raise NotFound(f"volume {name} does not exist")
        return next((v for v in found if v.name == name), found[0])

    def create(self, name: str, size_mb: int = DEFAULT_SIZE_MB, api_key: ApiKey | None = None) -> VolumeRecord:
        check_name(name)
        if isinstance(size_mb, bool) or not isinstance(size_mb, int) or not MIN_SIZE_MB <= size_mb <= MAX_SIZE_MB:
            raise InvalidRequest(f"a volume's size must be {MIN_SIZE_MB}-{MAX_SIZE_MB} MiB, not {size_mb!r}")
        vol = VolumeRecord(id="v" + secrets.token_hex(8), name=name, owner=_owner(api_key), size_mb=size_mb,
                           created_at=time.time())
        with self.lock():
            if self._rows("WHERE owner=? AND name=?", (vol.owner, name)):
                raise Conflict(f"volume {name} already exists")
            if len(self._rows("WHERE owner=?", (vol.owner,))) >= MAX_PER_KEY:
                raise QuotaExceeded(f"an API key may keep at most {MAX_PER_KEY} volumes; remove some first")
            # Image first, then the record: a crash in between leaves an image no record explains, which
            # reconcile (under this lock) deletes; never a record without its image.
            self.images.create(vol.id, size_mb)
            self._db.execute("INSERT INTO volumes (id, owner, name, size_mb, created_at) VALUES (?,?,?,?,?)",
                             (vol.id, vol.owner, vol.name, vol.size_mb, vol.created_at))
        return vol

    def remove(self, name: str, api_key: ApiKey | None = None) -> None:
        """Delete the volume and its files; ``Conflict`` while any sandbox (in any state) lists it."""
        with self.lock():
            vol = self.get(name, api_key)
            users = self.users(vol.id)
            if users:
                raise Conflict(f"volume {vol.name} is in use by sandbox{'es' if len(users) > 1 else ''} "
                               f"{', '.join(sorted(users))}")
            # The record goes first: a crash after it leaves an orphaned image that reconcile removes.
            self._db.execute("DELETE FROM volumes WHERE id=?", (vol.id,))
            self.images.remove(vol.id)

    def users(self, volume_id: str) -> set[str]:
        return {r.id for r in self.sandboxes.all() if any(m.get("id") == volume_id for m in r.volumes)}

    def usage(self, vol: VolumeRecord) -> dict:
        """The record with the sandboxes that use it and, while mounted, its used/total bytes."""
        out = vol.to_dict()
        out["sandboxes"] = sorted(self.users(vol.id))
        du = self.images.usage(vol.id)
        out["used_bytes"], out["total_bytes"] = (du.used, du.total) if du else (None, None)
        return out

    # --- sandboxes ---------------------------------------------------------------------------
    def resolve(self, wanted: list | None, api_key: ApiKey | None) -> list[dict]:
        """What a sandbox's record keeps of the mounts it asked for: ``[{id, name, path, read_only}]``.
        Call under ``lock()`` and write the record before releasing it."""
        out: list[dict] = []
        if not wanted:
            return out
        if not isinstance(wanted, list) or len(wanted) > MAX_MOUNTS:
            raise InvalidRequest(f"volumes must be a list of at most {MAX_MOUNTS} mounts")
        paths: set[str] = set()
        for item in wanted:
            if not isinstance(item, dict):
                item = {"name": getattr(item, "name", None), "path": getattr(item, "path", None),
                        "read_only": getattr(item, "read_only", False)}
            name, path = check_name(item.get("name")), check_mount_path(item.get("path"))
            read_only = item.get("read_only", False)
            if not isinstance(read_only, bool):
                raise InvalidRequest(f"read_only of volume {name} must be true or false")
            if any(p == path or p.startswith(path + "/") or path.startswith(p + "/") for p in paths):
                raise InvalidRequest(f"volume mount paths overlap at {path}")
            paths.add(path)
            vol = self.get(name, api_key)  # NotFound for another key's volume
            out.append({"id": vol.id, "name": vol.name, "path": path, "read_only": read_only})
        return out

    def attach(self, rec: SandboxRecord) -> tuple[tuple[str, str, bool], ...]:
        """Mount (once, on the host) every volume the sandbox lists; the ``SandboxSpec.volumes`` to bind."""
        if not rec.volumes:
            return ()
        with self.lock():
            return tuple((str(self.images.mount(m["id"])), m["path"], bool(m["read_only"])) for m in rec.volumes)

    def release(self) -> None:
        """Unmount every host mount that no live sandbox uses any more (a failure is left to reconcile)."""
        try:
            with self.lock():
                self._unmount_unused()
        except (ShoalError, OSError):
            pass

    def _unmount_unused(self) -> None:
        wanted = {m["id"] for r in self.sandboxes.all() if _live(r) for m in r.volumes}
        for vid in self.images.existing():
            if vid not in wanted and self.images.is_mounted(vid):
                try:
                    self.images.unmount(vid)
                except OSError:
                    pass  # busy: the next release or reconcile

    def reconcile(self) -> None:
        """After a crash: delete what no volume record explains (a create or rm cut short), unmount what no
        live sandbox uses, and mount again the volumes of live sandboxes whose host mount is gone."""
        with self.lock():
            self.images.sweep_temporaries()
            known = {v.id for v in self._rows()}
            for vid in self.images.existing() - known:
                try:
                    self.images.remove(vid)
                except (ShoalError, OSError):
                    pass
            self._unmount_unused()
            for rec in self.sandboxes.all():
                if rec.state is not SandboxState.RUNNING and not (rec.state is SandboxState.PAUSED and _live(rec)):
                    continue
                for m in rec.volumes:
                    if m["id"] in known and not self.images.is_mounted(m["id"]):
                        try:
                            self.images.mount(m["id"], wait=0)
                        except (ShoalError, OSError):
                            pass  # still held by the sandbox's own bind: new users wait for it to go

    def close(self) -> None:
        self._db.close()
