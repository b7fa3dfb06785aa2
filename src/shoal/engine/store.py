"""The sandbox store: one SQLite file in WAL mode, shared by the CLI and the daemon.

WAL lets many readers run beside one writer, which is what a daemon plus CLI processes need;
every write is a short transaction. The store is the memory that lets a restarted process find
every host resource again (they are all named after the sandbox id).
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from pathlib import Path

from shoal.engine.models import SandboxRecord, SandboxState

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sandboxes (
    id TEXT PRIMARY KEY,
    template TEXT NOT NULL,
    state TEXT NOT NULL,
    cpu REAL NOT NULL,
    memory_mb INTEGER NOT NULL,
    disk_mb INTEGER NOT NULL,
    created_at REAL NOT NULL,
    runtime TEXT NOT NULL,
    env TEXT NOT NULL,
    metadata TEXT NOT NULL,
    owner_pid INTEGER,
    owner_start INTEGER,
    expires_at REAL,
    api_key TEXT,
    reason TEXT,
    layer TEXT,
    pause_mode TEXT,
    started_at REAL,
    boot_id TEXT
);
"""
_COLUMNS = ("id", "template", "state", "cpu", "memory_mb", "disk_mb", "created_at", "runtime", "env",
            "metadata", "owner_pid", "owner_start", "expires_at", "api_key", "reason", "layer", "pause_mode",
            "started_at", "boot_id", "address", "address6", "internet", "networks", "name",
            "volumes", "standby_after", "snapshot")
#: Columns added after the first release: (name, SQL type), added to older databases on open.
_ADDED_COLUMNS = (("reason", "TEXT"), ("layer", "TEXT"), ("pause_mode", "TEXT"), ("started_at", "REAL"),
                  ("boot_id", "TEXT"), ("address", "TEXT"), ("address6", "TEXT"), ("internet", "INTEGER"),
                  ("networks", "TEXT"), ("name", "TEXT"),
                  ("volumes", "TEXT"), ("standby_after", "REAL"), ("snapshot", "TEXT"))


def connect_private(path: Path) -> sqlite3.Connection:
    """Open the database readable by root alone (it holds API key hashes and every sandbox's env),
    like ``local.key``; SQLite gives its -wal and -shm files the database file's mode."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Only when creating it: closing any fd of the file drops every POSIX lock this process holds on it,
    # so doing this beside an open connection (Store, then KeyStore, same file) lets another process
    # delete the live WAL under it (database disk image is malformed).
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except FileExistsError:
        pass
    for p in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):  # databases made before this was enforced
        try:
            os.chmod(p, 0o600)
        except FileNotFoundError:
            pass
    return sqlite3.connect(str(path), timeout=30, isolation_level=None, check_same_thread=False)


class Store:
    def __init__(self, path: Path) -> None:
        self._db = connect_private(path)
        self._lock = threading.Lock()
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        have = {row[1] for row in self._db.execute("PRAGMA table_info(sandboxes)")}
        for name, sql_type in _ADDED_COLUMNS:
            if name not in have:
                try:
                    self._db.execute(f"ALTER TABLE sandboxes ADD COLUMN {name} {sql_type}")
                except sqlite3.OperationalError:  # another process added it first
                    pass

    @staticmethod
    def _row(row: tuple) -> SandboxRecord:
        d = dict(zip(_COLUMNS, row, strict=False))
        d["state"] = SandboxState(d["state"])
        d["env"] = json.loads(d["env"])
        d["metadata"] = json.loads(d["metadata"])
        d["layer"] = d["layer"] or "ram"  # records from before the disk layer lived on a tmpfs
        d["internet"] = None if d["internet"] is None else bool(d["internet"])
        d["networks"] = json.loads(d["networks"]) if d.get("networks") else []
        d["volumes"] = json.loads(d["volumes"]) if d.get("volumes") else []
        return SandboxRecord(**d)

    def put(self, rec: SandboxRecord) -> None:
        values = [getattr(rec, c) for c in _COLUMNS]
        values[_COLUMNS.index("state")] = rec.state.value
        values[_COLUMNS.index("env")] = json.dumps(rec.env)
        values[_COLUMNS.index("metadata")] = json.dumps(rec.metadata)
        values[_COLUMNS.index("networks")] = json.dumps(rec.networks) if rec.networks else None
        values[_COLUMNS.index("volumes")] = json.dumps(rec.volumes) if rec.volumes else None
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO sandboxes ({','.join(_COLUMNS)}) "
                             f"VALUES ({','.join('?' * len(_COLUMNS))})", values)

    def get(self, sandbox_id: str) -> SandboxRecord | None:
        with self._lock:
            row = self._db.execute(f"SELECT {','.join(_COLUMNS)} FROM sandboxes WHERE id=?", (sandbox_id,)).fetchone()
        return self._row(row) if row else None

    def all(self) -> list[SandboxRecord]:
        with self._lock:
            rows = self._db.execute(f"SELECT {','.join(_COLUMNS)} FROM sandboxes ORDER BY created_at").fetchall()
        return [self._row(r) for r in rows]

    def set_state(self, sandbox_id: str, state: SandboxState) -> None:
        with self._lock:
            self._db.execute("UPDATE sandboxes SET state=? WHERE id=?", (state.value, sandbox_id))

    def transition(self, sandbox_id: str, expected: SandboxState, to: SandboxState, reason: str,
                   pause_mode: str | None = None) -> bool:
        """``expected`` → ``to`` with ``reason``, only if still in ``expected`` (a destroy may have begun)."""
        with self._lock:
            cur = self._db.execute("UPDATE sandboxes SET state=?, reason=?, pause_mode=? WHERE id=? AND state=?",
                                   (to.value, reason, pause_mode, sandbox_id, expected.value))
        return cur.rowcount == 1

    def delete(self, sandbox_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM sandboxes WHERE id=?", (sandbox_id,))

    def close(self) -> None:
        self._db.close()


# --- snapshots (engine/snapshots.py) --------------------------------------------------------------
_SNAPSHOT_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id TEXT PRIMARY KEY,
    name TEXT,
    api_key TEXT,
    template TEXT NOT NULL,
    template_digest TEXT NOT NULL,
    parent TEXT,
    source_sandbox TEXT,
    created_at REAL NOT NULL,
    size_bytes INTEGER NOT NULL,
    internal INTEGER NOT NULL
);
"""
_SNAPSHOT_COLUMNS = ("id", "name", "api_key", "template", "template_digest", "parent", "source_sandbox",
                     "created_at", "size_bytes", "internal")


class SnapshotStore:
    """The snapshots table, in the same database file as the sandboxes (like ``KeyStore``).
    A row exists only for a whole image on the host (``storage/snapshots.py`` writes it first)."""

    def __init__(self, path: Path) -> None:
        self._db = connect_private(path)
        self._lock = threading.Lock()
        self._db.executescript(_SNAPSHOT_SCHEMA)

    def put(self, row: dict) -> None:
        with self._lock:
            self._db.execute(f"INSERT OR REPLACE INTO snapshots ({','.join(_SNAPSHOT_COLUMNS)}) "
                             f"VALUES ({','.join('?' * len(_SNAPSHOT_COLUMNS))})",
                             [row[c] for c in _SNAPSHOT_COLUMNS])

    def get(self, snapshot_id: str) -> dict | None:
        with self._lock:
            row = self._db.execute(f"SELECT {','.join(_SNAPSHOT_COLUMNS)} FROM snapshots WHERE id=?",
                                   (snapshot_id,)).fetchone()
        return dict(zip(_SNAPSHOT_COLUMNS, row, strict=True)) if row else None

    def all(self) -> list[dict]:
        with self._lock:
            rows = self._db.execute(f"SELECT {','.join(_SNAPSHOT_COLUMNS)} FROM snapshots "
                                    "ORDER BY created_at").fetchall()
        return [dict(zip(_SNAPSHOT_COLUMNS, r, strict=True)) for r in rows]

    def rename(self, snapshot_id: str, name: str | None) -> None:
        with self._lock:
            self._db.execute("UPDATE snapshots SET name=? WHERE id=?", (name, snapshot_id))

    def delete(self, snapshot_id: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM snapshots WHERE id=?", (snapshot_id,))
