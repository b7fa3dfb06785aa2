"""Private networks in the kernel and in DNS: which sandboxes may open connections to which.

The safe default (``firewall.py``) drops every new connection from one sandbox to another. A private
network lifts that for its members, and only between them, with one static rule at the head of the
``through`` (forward) chain and one set::

    meta iifname . meta oifname @peers accept

``peers`` holds ``(sender veth, receiver veth)`` for every ordered pair of sandboxes that share a
network. Anti-spoofing (the ``guard`` chain) already ties a sandbox's packets to its veth, and routing
ties a destination address to the receiver's veth, so the pair says exactly "sender and receiver are
in one network", for TCP, UDP and anything else, IPv4 and IPv6 alike. A join or a leave is then one
batch of set elements, never a rule edit (the table's design rule); the cost is ``2 × (members - 1)``
elements per member, which is why ``engine.networks`` caps members per network.

Membership lives in the slot files (``{"sandbox": id, ..., "networks": [ids], "name": name}``), the
same truth the rest of the table is rebuilt from, so a reconcile after a crash restores it with
everything else.

DNS: ``Directory.answer`` serves ``<sandbox-id>.<SUFFIX>`` and ``<name>.<SUFFIX>`` (A and AAAA) to a
sandbox that shares a network with the one named, and NXDOMAIN to anyone else: a non-member learns
nothing, not even whether the name exists. The sandbox's resolv.conf searches ``SUFFIX``, so the bare
name works too.
"""

from __future__ import annotations

import ipaddress
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from shoal.net.nft import ACCEPT, concat, match, meta

#: Names under this suffix are answered by Shoal (``.internal`` is reserved for private use by ICANN).
SUFFIX = "shoal.internal"
PEERS = "peers"
#: How long the DNS directory may lag the slot files (it is rebuilt when their directory changes).
DIRECTORY_TTL_S = 1.0


@dataclass(frozen=True)
class Member:
    """One sandbox's place in private networks, as its slot file says."""

    sandbox: str
    veth: str
    ipv4: str
    ipv6: str
    networks: tuple[str, ...]
    name: str | None


def member_of(data: object) -> tuple[tuple[str, ...], str | None]:
    """The (network ids, name) a slot file grants; slot files are ours, but read defensively."""
    if not isinstance(data, dict) or "sandbox" not in data:
        return (), None
    nets = data.get("networks")
    nets = tuple(n for n in nets if isinstance(n, str)) if isinstance(nets, list) else ()
    name = data.get("name") if isinstance(data.get("name"), str) else None
    return nets, name


def pairs(veth: str, networks: tuple[str, ...], members: list[Member]) -> list[dict]:
    """``peers`` elements between ``veth`` and every other member of any of ``networks``."""
    out, seen = [], set()
    for m in members:
        if m.veth == veth or m.veth in seen or not set(m.networks) & set(networks):
            continue
        seen.add(m.veth)
        out += [concat(veth, m.veth), concat(m.veth, veth)]
    return out


class PeerRules:
    """The nft commands for private networks in the instance's table."""

    def __init__(self, table: str) -> None:
        self.table = table

    def _t(self, **kw: object) -> dict:
        return {"family": "inet", "table": self.table, **kw}

    def table_commands(self, members: list[Member]) -> list[dict]:
        """Appended to the table's rebuild: the set, the rule at the head of ``through``, every pair."""
        cmds: list[dict] = [
            {"add": {"set": self._t(name=PEERS, type=["ifname", "ifname"])}},
            {"insert": {"rule": self._t(chain="through", expr=[
                match(concat(meta("iifname"), meta("oifname")), "@" + PEERS), ACCEPT])}},
        ]
        elems = []
        for m in members:
            elems += [e for e in pairs(m.veth, m.networks, members) if e["concat"][0] == m.veth]
        if elems:
            cmds.append({"add": {"element": self._t(name=PEERS, elem=elems)}})
        return cmds

    def join(self, veth: str, networks: tuple[str, ...], members: list[Member]) -> list[dict]:
        elems = pairs(veth, networks, members)
        return [{"add": {"element": self._t(name=PEERS, elem=elems)}}] if elems else []

    def leave(self, veth: str, networks: tuple[str, ...], members: list[Member]) -> list[dict]:
        """Add, then delete: deleting an absent element fails the whole batch (nft 1.0.6 has no destroy)."""
        elems = pairs(veth, networks, members)
        if not elems:
            return []
        return [{"add": {"element": self._t(name=PEERS, elem=elems)}},
                {"delete": {"element": self._t(name=PEERS, elem=elems)}}]


class Directory:
    """Private-network DNS for one instance, built from its slot files (each process its own copy)."""

    def __init__(self, slots_dir: str, read_members: Callable[[], list[Member]], subnet4: ipaddress.IPv4Network,
                 first_slot_offset: int = 2) -> None:
        self.slots_dir, self.read_members = slots_dir, read_members
        self.subnet4, self.offset = subnet4, first_slot_offset
        self._lock = threading.Lock()
        self._stamp: tuple[int, float] | None = None
        self._by_ipv4: dict[str, Member] = {}
        self._members: list[Member] = []

    def _refresh(self) -> None:
        try:
            mtime = os.stat(self.slots_dir).st_mtime_ns
        except OSError:
            mtime = 0
        now = time.monotonic()
        with self._lock:
            if self._stamp is not None and self._stamp[0] == mtime and now - self._stamp[1] < DIRECTORY_TTL_S:
                return
            members = [m for m in self.read_members() if m.networks]
            self._members, self._by_ipv4 = members, {m.ipv4: m for m in members}
            self._stamp = (mtime, now)

    def lookup(self, asker: str, label: str) -> list[Member]:
        """The members named ``label`` (a sandbox id or name) that share a network with ``asker``."""
        self._refresh()
        me = self._by_ipv4.get(asker)
        if me is None:
            return []
        return [m for m in self._members if (m.sandbox == label or m.name == label)
                and set(m.networks) & set(me.networks)]

    def answer(self, data: bytes, asker: str) -> bytes | None:
        """A reply to a query under ``SUFFIX``; None for any other name (it goes on to the upstream)."""
        from dnslib import AAAA, QTYPE, RCODE, RR, A, DNSError, DNSRecord

        try:
            query = DNSRecord.parse(data)
        except (DNSError, Exception):  # noqa: BLE001 - dnslib raises assorted errors on garbage
            return None
        if query.header.qr or len(query.questions) != 1:
            return None
        qname = str(query.q.qname).rstrip(".").lower()
        if qname != SUFFIX and not qname.endswith("." + SUFFIX):
            return None
        label = qname[: -len(SUFFIX) - 1] if qname != SUFFIX else ""
        reply = query.reply()
        found = self.lookup(asker, label) if label and "." not in label else []
        if not found:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply.pack()
        for m in found:
            if query.q.qtype in (QTYPE.A, QTYPE.ANY):
                reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(m.ipv4), ttl=5))
            if query.q.qtype in (QTYPE.AAAA, QTYPE.ANY):
                reply.add_answer(RR(query.q.qname, QTYPE.AAAA, rdata=AAAA(m.ipv6), ttl=5))
        return reply.pack()
