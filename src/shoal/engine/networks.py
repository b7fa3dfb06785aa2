"""Private networks: named groups of sandboxes that may reach each other, one namespace per API key.

A network is only a name until a sandbox joins it: the registry (a table in the store's SQLite file)
remembers which names each key made, and a sandbox's record lists the networks it joined at create
(``SandboxRecord.networks``) and its optional DNS name. The kernel side (who may talk to whom, DNS
answers) is ``shoal.net.private_networks``, driven from the slot files, keyed by ``network_id``: a hash
of (key, name), so two keys' networks called ``db`` are two networks and a name is never a reference
another tenant can forge.

Joining happens at create only (membership is fixed for a sandbox's life); ``rm`` is refused (409)
while any sandbox, in any state, is a member.
"""

from __future__ import annotations

import hashlib
import re
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from shoal.engine.models import SandboxRecord
from shoal.engine.store import connect_private
from shoal.errors import Conflict, InvalidRequest, NotFound

#: A DNS label (RFC 1123), lower case: network names and sandbox names both end up in DNS or nft names.
NAME_RE = re.compile(r"^[a-z]([a-z0-9-]{0,30}[a-z0-9])?$")
#: Bounds: each membership adds 2 × (members - 1) elements to the ``peers`` set, so both are capped.
MAX_NETWORKS_PER_SANDBOX = 8
MAX_MEMBERS = 128
MAX_NETWORKS_PER_KEY = 256

_SCHEMA = """
CREATE TABLE IF NOT EXISTS networks (
    owner TEXT NOT NULL,
    name TEXT NOT NULL,
    created_at REAL NOT NULL,
    PRIMARY KEY (owner, name)
);
"""


def check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise InvalidRequest(f"{what} must be 1-32 characters: lower-case letters, digits and '-', starting with a "
                             f"letter and not ending with '-' (got {str(value)[:40]!r})")
    return value


def network_id(owner: str | None, name: str) -> str:
    """The kernel-side id of ``owner``'s network ``name`` (10 hex digits, used in slot files)."""
    return hashlib.sha256(f"shoal-net:{owner or ''}\0{name}".encode()).hexdigest()[:10]


@dataclass(frozen=True)
class PrivateNetwork:
    name: str
    created_at: float
    members: list[str]

    def to_dict(self) -> dict:
        return {"name": self.name, "created_at": self.created_at, "members": self.members}


class NetworkRegistry:
    """The networks each API key made (``owner`` None: the local operator, using the engine directly)."""

    def __init__(self, path: Path) -> None:
        self._db = connect_private(path)
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    @staticmethod
    def _owner(owner: str | None) -> str:
        return owner or ""

    def create(self, owner: str | None, name: str) -> PrivateNetwork:
        check_name(name, "a network name")
        with self._lock:
            count = self._db.execute("SELECT COUNT(*) FROM networks WHERE owner=?", (self._owner(owner),)).fetchone()[0]
            if count >= MAX_NETWORKS_PER_KEY:
                raise Conflict(f"at most {MAX_NETWORKS_PER_KEY} networks per API key")
            try:
                now = time.time()
                self._db.execute("INSERT INTO networks (owner, name, created_at) VALUES (?, ?, ?)",
                                 (self._owner(owner), name, now))
            except sqlite3.IntegrityError:
                raise Conflict(f"network {name} already exists") from None
        return PrivateNetwork(name, now, [])

    def names(self, owner: str | None) -> dict[str, float]:
        with self._lock:
            rows = self._db.execute("SELECT name, created_at FROM networks WHERE owner=? ORDER BY name",
                                    (self._owner(owner),)).fetchall()
        return dict(rows)

    def list(self, owner: str | None, records: list[SandboxRecord]) -> list[PrivateNetwork]:
        mine = [r for r in records if r.api_key == owner]
        return [PrivateNetwork(n, t, [r.id for r in mine if n in r.networks]) for n, t in self.names(owner).items()]

    def get(self, owner: str | None, name: str, records: list[SandboxRecord]) -> PrivateNetwork:
        for net in self.list(owner, records):
            if net.name == name:
                return net
        raise NotFound(f"network {name} does not exist")

    def delete(self, owner: str | None, name: str, records: list[SandboxRecord]) -> None:
        """Refused while a sandbox of ``owner`` (in any state: a paused one comes back into it) is a member.
        The caller holds the engine's admission lock, so no create joins between the check and the delete."""
        net = self.get(owner, name, records)
        if net.members:
            raise Conflict(f"network {name} still has {len(net.members)} member(s): {', '.join(net.members[:8])}; "
                           "delete them first")
        with self._lock:
            self._db.execute("DELETE FROM networks WHERE owner=? AND name=?", (self._owner(owner), name))

    def check_join(self, owner: str | None, networks: list[str], name: str | None,
                   records: list[SandboxRecord]) -> list[str]:
        """Validate a create's ``networks`` and ``name`` (under the admission lock); the network ids to join.

        Unknown networks (another key's are unknown too) are 404; a full network, or a ``name`` another
        member of one of them already has, is 409."""
        if name is not None:
            check_name(name, "a sandbox name")
        if not isinstance(networks, list | tuple) or len(networks) > MAX_NETWORKS_PER_SANDBOX:
            raise InvalidRequest(f"a sandbox joins at most {MAX_NETWORKS_PER_SANDBOX} networks")
        wanted = list(dict.fromkeys(check_name(n, "a network name") for n in networks))
        if not wanted:
            return []
        have = self.names(owner)
        mine = [r for r in records if r.api_key == owner]
        for n in wanted:
            if n not in have:
                raise NotFound(f"network {n} does not exist (create it with: shoal network create {n})")
            members = [r for r in mine if n in r.networks]
            if len(members) >= MAX_MEMBERS:
                raise Conflict(f"network {n} is full ({MAX_MEMBERS} members)")
            if name is not None and any(r.name == name for r in members):
                raise Conflict(f"the name {name} is taken in network {n}")
        return [network_id(owner, n) for n in wanted]
