"""API keys: who may use the daemon, which sandboxes each one sees, and its limits.

A key is ``shoal_<40 hex>``; only its SHA-256 is stored. The same secret in E2B's shape
(``e2b_<40 hex>``) is the same key, so one key drives both the native API and the E2B SDKs.

An ``admin`` key is the operator's: it alone sees operator-wide figures (every tenant's series in
``/metrics``). Every other key is a tenant and sees only what it owns. The daemon's own
``local.key`` is admin, since only root can read it; ``shoal keys create --admin`` makes more.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from shoal.errors import InvalidRequest, NotFound

PREFIX = "shoal_"
E2B_PREFIX = "e2b_"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at REAL NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0,
    max_sandboxes INTEGER,
    max_memory_mb INTEGER,
    admin INTEGER NOT NULL DEFAULT 0
);
"""
_COLUMNS = "id, name, created_at, revoked, max_sandboxes, max_memory_mb, admin"


@dataclass
class ApiKey:
    id: str
    name: str
    created_at: float
    revoked: bool = False
    max_sandboxes: int | None = None
    max_memory_mb: int | None = None
    admin: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def _secret_part(key: str) -> str | None:
    for prefix in (PREFIX, E2B_PREFIX):
        if key.startswith(prefix):
            return key[len(prefix):]
    return None


def looks_like_key(value: str) -> bool:
    """Whether ``value`` has the shape of a Shoal key (either form): such a header value is a credential
    meant for the daemon, never for a service in a sandbox."""
    return _secret_part(value) is not None


def _hash(secret_hex: str) -> str:
    return hashlib.sha256(secret_hex.encode()).hexdigest()


def e2b_form(key: str) -> str:
    """The same key as the E2B SDKs want it (``e2b_<hex>``)."""
    part = _secret_part(key)
    if part is None:
        raise InvalidRequest("not a Shoal API key")
    return E2B_PREFIX + part


class KeyStore:
    def __init__(self, path: Path) -> None:
        from shoal.engine.store import connect_private
        self._db = connect_private(path)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._migrate()
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, ApiKey | None]] = {}

    def _migrate(self) -> None:
        """Databases made before keys had an ``admin`` flag get the column; their keys stay tenants
        (the daemon promotes its own ``local.key`` at start)."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(api_keys)")}
        if "admin" not in columns:
            try:
                self._db.execute("ALTER TABLE api_keys ADD COLUMN admin INTEGER NOT NULL DEFAULT 0")
            except sqlite3.OperationalError as exc:  # another process migrated first
                if "duplicate column" not in str(exc):
                    raise

    def create(self, name: str = "default", max_sandboxes: int | None = None,
               max_memory_mb: int | None = None, admin: bool = False) -> tuple[ApiKey, str]:
        """A new key and its secret (shown once, never stored)."""
        for label, value in (("max_sandboxes", max_sandboxes), ("max_memory_mb", max_memory_mb)):
            if value is not None and value < 1:
                raise InvalidRequest(f"{label} must be at least 1")
        secret_hex = secrets.token_hex(20)
        key = ApiKey(id="key_" + secrets.token_hex(6), name=name, created_at=time.time(),
                     max_sandboxes=max_sandboxes, max_memory_mb=max_memory_mb, admin=bool(admin))
        with self._lock:
            self._db.execute("INSERT INTO api_keys (id, name, hash, created_at, revoked, max_sandboxes, max_memory_mb, "
                             "admin) VALUES (?,?,?,?,0,?,?,?)", (key.id, name, _hash(secret_hex), key.created_at,
                                                                 max_sandboxes, max_memory_mb, int(bool(admin))))
        return key, PREFIX + secret_hex

    def _row(self, row: tuple) -> ApiKey:
        return ApiKey(id=row[0], name=row[1], created_at=row[2], revoked=bool(row[3]),
                      max_sandboxes=row[4], max_memory_mb=row[5], admin=bool(row[6]))

    def list(self) -> list[ApiKey]:
        with self._lock:
            rows = self._db.execute(f"SELECT {_COLUMNS} FROM api_keys ORDER BY created_at").fetchall()
        return [self._row(r) for r in rows]

    def revoke(self, key_id: str) -> None:
        with self._lock:
            cur = self._db.execute("UPDATE api_keys SET revoked=1 WHERE id=? OR name=?", (key_id, key_id))
            self._cache.clear()
        if cur.rowcount == 0:
            raise NotFound(f"API key {key_id} does not exist")

    def set_admin(self, key_id: str, admin: bool = True) -> None:
        """Make a key (by id) the operator's, or a tenant again; effective within a second (``verify``'s cache)."""
        with self._lock:
            cur = self._db.execute("UPDATE api_keys SET admin=? WHERE id=?", (int(bool(admin)), key_id))
            self._cache.clear()
        if cur.rowcount == 0:
            raise NotFound(f"API key {key_id} does not exist")

    def verify(self, key: str) -> ApiKey | None:
        """The live key behind ``key`` (either form), or None. Cached for a second: this is on
        every request's path, and a revocation takes effect within that second."""
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and now - hit[0] < 1.0:
            return hit[1]
        part = _secret_part(key)
        found = None
        if part is not None:
            with self._lock:
                row = self._db.execute(f"SELECT {_COLUMNS} FROM api_keys WHERE hash=?", (_hash(part),)).fetchone()
            if row is not None and not row[3]:
                found = self._row(row)
        if len(self._cache) > 10000:
            self._cache.clear()
        self._cache[key] = (now, found)
        return found
