"""Egress policy and limits of running sandboxes: stored, applied, and asked by the resolver and proxy.

The policy of a sandbox lives in ``<state>/net-policy/<id>.json`` (state, not run: a host reboot must not
turn a locked-down sandbox into an open one when it resumes), written before the rules change and read
back by every process of the instance: the daemon, a CLI, a test's engine each run a resolver and a
proxy on the same sockets (SO_REUSEPORT), and whichever the kernel picks must know the policy. Reads are
cached by the file's mtime.

The resolver and proxy learn *which* sandbox asks from the source address alone: the firewall drops
spoofed sources before anything else sees them, and slot ``n`` has addresses ``subnet + 2 + n``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from shoal.errors import RuntimeFailure
from shoal.net import names, nft, shaping
from shoal.net.egress_proxy import Decision
from shoal.net.policy import EgressPolicy, NetLimits, forbidden

if TYPE_CHECKING:
    from shoal.net.network import Network

log = logging.getLogger("shoal.net.egress")
#: An admitted address lives at least this long (a TTL of 0 would let the connection that follows the
#: answer miss it) and at most a day.
MIN_ADMIT_S, MAX_ADMIT_S = 30, 86400
LOCAL_ADDRESSES_TTL = 5.0


class PolicyFiles:
    """``<state>/net-policy/<id>.json``: ``{"policy": ..., "limits": ..., "internet": bool}``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._cache: dict[str, tuple[int, tuple[EgressPolicy, NetLimits]]] = {}
        self._lock = threading.Lock()

    def _path(self, sandbox_id: str) -> Path:
        return self.root / f"{sandbox_id}.json"

    def save(self, sandbox_id: str, policy: EgressPolicy, limits: NetLimits) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.root / f".{sandbox_id}.{os.getpid()}.{threading.get_ident()}"
        tmp.write_text(json.dumps({"policy": policy.to_dict(), "limits": limits.to_dict()}))
        os.replace(tmp, self._path(sandbox_id))

    def load(self, sandbox_id: str) -> tuple[EgressPolicy, NetLimits] | None:
        path = self._path(sandbox_id)
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            return None
        with self._lock:
            hit = self._cache.get(sandbox_id)
        if hit is not None and hit[0] == mtime:
            return hit[1]
        try:
            data = json.loads(path.read_text())
            value = (EgressPolicy.parse(data["policy"]), NetLimits.parse(data["limits"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        with self._lock:
            self._cache[sandbox_id] = (mtime, value)
        return value

    def drop(self, sandbox_id: str) -> None:
        with self._lock:
            self._cache.pop(sandbox_id, None)
        try:
            self._path(sandbox_id).unlink()
        except OSError:
            pass

    def sweep(self, alive: set[str], grace: float) -> None:
        """Drop the files of sandboxes not in ``alive`` and older than ``grace`` seconds (a create in another
        process writes its file after ``alive`` was read)."""
        try:
            entries = list(os.scandir(self.root))
        except OSError:
            return
        for entry in entries:
            sandbox_id = entry.name.removesuffix(".json")
            try:
                old = time.time() - entry.stat().st_mtime > grace
            except OSError:
                continue
            if old and (sandbox_id not in alive or entry.name.startswith(".")):
                self.drop(sandbox_id) if not entry.name.startswith(".") else os.unlink(entry.path)


class Egress:
    """The policy side of one ``Network``."""

    def __init__(self, net: Network) -> None:
        self.net = net
        self.files = PolicyFiles(net.settings.state_dir / "net-policy")
        self._local: tuple[float, list] = (0.0, [])

    # --- applying ---------------------------------------------------------------------------------
    def rules_of(self, sandbox_id: str) -> tuple[EgressPolicy | None, NetLimits]:
        stored = self.files.load(sandbox_id)
        if stored is None:
            return None, NetLimits()
        policy, limits = stored
        return (None if policy.default or not self.net.config.internet else policy), limits

    def commands(self, slot: int, policy: EgressPolicy | None, limits: NetLimits | None, flush_names: bool,
                 fresh: bool = True) -> list[dict]:
        """The batch that gives slot ``slot`` this policy and connection cap (caller holds the lock);
        ``limits`` None: the cap stays; ``fresh``: the slot has no policy chains yet."""
        fw, veth = self.net.firewall, names.veth(self.net.instance, slot)
        cmds = [] if limits is None else fw.set_cap(slot, veth, limits.max_connections)
        if policy is None or policy.default or not self.net.config.internet:
            return cmds + ([] if fresh else fw.clear_policy(slot, veth))
        return cmds + fw.set_policy(slot, veth, policy, flush_names, fresh)

    def shape(self, slot: int, limits: NetLimits) -> None:
        if limits.egress_mbit or limits.ingress_mbit:
            _, ns, _ = self.net._paths(slot)
            shaping.apply(ns, names.veth(self.net.instance, slot), limits.egress_mbit, limits.ingress_mbit)

    def update(self, sandbox_id: str, policy: EgressPolicy) -> None:
        """Replace a running sandbox's policy: stored first, then one nft batch (limits unchanged)."""
        net = self.net
        net.ensure()
        with net._locked():
            slot = net.slot_of(sandbox_id)
            data = net.owners.read(slot) if slot is not None else None
            if not (isinstance(data, dict) and data.get("sandbox") == sandbox_id):
                raise RuntimeFailure(f"sandbox {sandbox_id} has no network", "network", sandbox_id)
            old, limits = self.rules_of(sandbox_id)
            self.files.save(sandbox_id, policy, limits)
            flush = old is None or old.domains != policy.domains
            nft.run(self.commands(slot, policy, None, flush, fresh=old is None), "network policy")

    # --- asked by the resolver and the proxy ----------------------------------------------------------
    def lookup(self, address: str) -> tuple[int, str, EgressPolicy | None] | None:
        """(slot, sandbox id, policy) of the sandbox that has ``address``, or None."""
        net = self.net
        try:
            addr = ipaddress.ip_address(address)
            subnet = net.subnet4 if addr.version == 4 else net.subnet6
            if addr not in subnet:
                return None
            slot = int(addr) - int(subnet.network_address) - 2
        except (ValueError, AttributeError):
            return None
        if slot < 0:
            return None
        data = net.owners.read(slot)
        if not isinstance(data, dict) or "sandbox" not in data:
            return None
        sandbox_id = str(data["sandbox"])
        return slot, sandbox_id, self.rules_of(sandbox_id)[0]

    def admit_answer(self, peer: str, reply: bytes) -> None:
        """Resolver hook, before the answer goes back: if the asking sandbox allows the name, admit the
        answer's addresses (never a forbidden one) into its set for their TTL."""
        found = self.lookup(peer)
        if found is None or found[2] is None or not found[2].domains:
            return
        slot, _, policy = found
        from dnslib import QTYPE, DNSRecord

        try:
            record = DNSRecord.parse(reply)
        except Exception:  # noqa: BLE001 - the upstream's garbage admits nothing
            return
        if len(record.questions) != 1 or not policy.allows_name(str(record.q.qname)):
            return
        admit = []
        for rr in record.rr:
            if rr.rtype in (QTYPE.A, QTYPE.AAAA):
                addr = str(rr.rdata)
                if not forbidden(addr, self._never()):
                    admit.append((addr, min(max(int(rr.ttl), MIN_ADMIT_S), MAX_ADMIT_S)))
        if admit:
            try:
                nft.run(self.net.firewall.admit(slot, admit[:64]), "admit resolved addresses")
            except RuntimeFailure as exc:  # its set is gone (deleted meanwhile) or full: nothing admitted
                log.info("not admitted for slot %s: %s", slot, exc.message)

    def decide(self, peer: str, dst: str, port: int, name: str | None, tls: bool) -> Decision:
        """The egress proxy's question: may ``peer`` reach ``dst:port`` asking for ``name``?"""
        found = self.lookup(peer)
        if found is None:
            return Decision(False, "not a sandbox of this host")
        slot, sandbox_id, policy = found
        if forbidden(dst, self._never()):
            return Decision(False, f"{dst} is never reachable from a sandbox")
        policy = policy or EgressPolicy()
        verdict = policy.verdict(dst)
        if verdict == "deny":
            return Decision(False, f"{dst} is denied")
        if verdict == "domain":
            if not name or not policy.allows_name(name):
                return Decision(False, f"{name or 'no host name'} is not an allowed name")
            if not self._admitted(slot, dst):
                return Decision(False, f"{dst} was not resolved for an allowed name")
        headers = policy.headers_for(name) if name else None
        if headers is not None and tls:
            return Decision(False, f"headers for {name} need TLS interception, not supported by this server")
        return Decision(True, key=sandbox_id, headers=headers)

    def _admitted(self, slot: int, address: str) -> bool:
        try:
            nft.run(self.net.firewall.admitted(slot, address), "admitted?")
        except RuntimeFailure:
            return True  # the probe fails exactly when the element exists
        return False

    def _never(self) -> list:
        """Sandbox subnets and the host's own addresses (refreshed every few seconds)."""
        stamp, local = self._local
        if time.monotonic() - stamp > LOCAL_ADDRESSES_TTL:
            local = [self.net.subnet4, self.net.subnet6]
            try:
                from pyroute2 import IPRoute

                with IPRoute() as ipr:
                    for a in ipr.get_addr():
                        value = a.get("IFA_LOCAL") or a.get("IFA_ADDRESS")
                        if value:
                            local.append(ipaddress.ip_network(value.split("%")[0]))
            except Exception:  # noqa: BLE001 - keep the last list we had rather than none
                log.warning("cannot list the host's addresses; keeping the previous list")
                local = self._local[1] or local
            self._local = (time.monotonic(), local)
        return local
