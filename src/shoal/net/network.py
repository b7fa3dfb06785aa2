"""``Network``: the sandboxes' network on this host for one Shoal instance.

Host state lives in ``<run>/net/`` (volatile, like the sandboxes) and in the kernel, all named with
the instance, so a crashed process' leftovers are found by name and never another instance's:

* ``slots/<n>``     the slot's owner: ``{"pool": [pid, start]}`` while a process holds it ready, then
                    ``{"sandbox": id, "internet": bool}``, then ``{"freeing": [pid, start]}`` while it is
                    torn down; made with O_EXCL, which allocates ``n`` (see owners.py: every change of
                    a slot is a compare-and-swap of this file, never an act on a number read earlier)
* ``ns/<n>``        the network namespace (bind mount), ``sys/<n>`` its sysfs
* ``sandboxes/<id>`` a symlink to the sandbox's slot number
* veth ``shv<tag><n>``; bridge ``shg<tag>``, with no port, holding the gateway and DNS addresses (this
  kernel has no dummy device); table ``inet shoal-<instance>``

Slot ``n`` has addresses ``subnet + 2 + n`` (IPv4 and IPv6); the gateway is ``subnet + 1``.
Every change of slots and table happens under ``<run>/net/lock`` (flock), so a daemon and a CLI
process of one instance, or a reconcile beside a create, never interleave.

Creating a slot costs ~tens of ms of netlink work, so each process keeps ``pool_size`` ready and
refills on a background thread; ``claim`` only renames ownership (and, for ``internet: false``, takes
the slot out of the ``online`` set).
"""

from __future__ import annotations

import atexit
import collections
import ipaddress
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from shoal import refill
from shoal.errors import CapacityExceeded, RuntimeFailure
from shoal.net import names, nft, owners, slotns
from shoal.net.config import NetConfig
from shoal.net.egress import Egress
from shoal.net.egress_proxy import EgressProxy, proxy_port
from shoal.net.firewall import Firewall, SlotRules
from shoal.net.policy import EgressPolicy, NetLimits
from shoal.net.private_networks import SUFFIX, Directory, Member, PeerRules, member_of
from shoal.net.resolver import Resolver
from shoal.settings import Settings

CA_BUNDLE_IN_SANDBOX = "shoal-ca-certificates.crt"
TEMPLATE_CA = "etc/ssl/certs/ca-certificates.crt"
MAX_TEMPLATE_CA = 4 << 20
ORPHAN_GRACE_S = 30.0
#: The pool refills this long after the last claim: making a slot is ~100 ms of pure-Python netlink work,
#: and done at once it would hold the GIL against the create that just claimed (measured: +25 ms p50).
REFILL_DELAY_S = 0.3
#: Host-wide: one file per instance that has a table, naming its run directory. An instance whose run
#: directory is gone (a finished test run, say) is dead, and the next instance to start sweeps its table,
#: gateway and veths; a live instance always has ``<run>/net``.
REGISTRY = Path("/run/shoal-net")
log = logging.getLogger("shoal.net")


@dataclass
class Lease:
    """A sandbox's network: what the runtime puts in its OCI config and writable layer."""

    slot: int
    veth: str
    ipv4: str
    ipv6: str
    netns: Path
    sysfs: Path
    internet: bool
    etc_files: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)


class Network:
    """One per (process, instance): see ``for_settings``."""

    _instances: dict[str, Network] = {}
    _instances_lock = threading.Lock()

    @classmethod
    def for_settings(cls, settings: Settings, config: NetConfig | None = None) -> Network:
        """The process' one ``Network`` of an instance (one resolver socket, one pool per process)."""
        with cls._instances_lock:
            net = cls._instances.get(settings.instance)
            if net is None:
                net = cls._instances[settings.instance] = cls(settings, config or NetConfig.from_env())
            return net

    def __init__(self, settings: Settings, config: NetConfig) -> None:
        self.settings, self.config = settings, config
        self.instance = settings.instance
        self.root = settings.run_dir / "net"
        self.owners = owners.OwnerFiles(self.root)
        self._ready = False
        self._setup_lock = threading.Lock()
        self._pool: collections.deque[int] = collections.deque()
        self._pool_cv = threading.Condition()
        self._filler: threading.Thread | None = None
        self._closed = False
        self._last_claim = 0.0
        self._resolver: Resolver | None = None
        self._ca_cache: dict[Path, str] = {}
        self.egress = Egress(self)  # egress policy and limits (egress.py)
        self._proxy: EgressProxy | None = None

    # --- host setup ---------------------------------------------------------------------------
    def _locked(self):  # noqa: ANN202 - the instance's lock (a context manager)
        return self.owners.locked()

    def ensure(self) -> None:
        """Set up the host once per process: subnets, gateway device, forwarding, table, resolver, pool."""
        if self._ready:
            return
        with self._setup_lock:
            if self._ready:
                return
            for d in ("slots", "ns", "sys", "sandboxes"):
                (self.root / d).mkdir(parents=True, exist_ok=True)
            os.chmod(self.root, 0o711)
            with self._locked():
                self._choose_subnets()
                self._gateway_device()
                for knob in ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"):
                    slotns._write(knob, "1")
                self.firewall = Firewall(self.instance, self.subnet4, self.subnet6, self.gateway4,
                                         proxy_port(self.instance))
                self.peers = PeerRules(names.table(self.instance))
                self._rebuild_table()
                REGISTRY.mkdir(mode=0o700, exist_ok=True)
                (REGISTRY / self.instance).write_text(str(self.root))
            sweep_dead_instances()
            self._resolver = Resolver(self.gateway4, self.config.upstreams(), self.subnet4)
            self.directory = Directory(str(self.root / "slots"), self._members, self.subnet4)
            self._resolver.local = self.directory.answer  # private networks' names, before the upstream
            self._resolver.on_answer = self.egress.admit_answer
            self._proxy = EgressProxy([self.gateway4, self.gateway6], proxy_port(self.instance), self.egress.decide)
            try:
                self._proxy.start()
            except OSError as exc:  # fail closed: proxied connections are refused by the kernel
                log.warning("egress proxy cannot listen on port %s: %s", proxy_port(self.instance), exc.strerror)
            try:
                self._resolver.start()
            except OSError as exc:
                raise RuntimeFailure(f"cannot serve DNS on {self.gateway4}:53: {exc.strerror}", "network") from exc
            atexit.register(self.close)
            self._ready = True
        self._start_filler()

    def _choose_subnets(self) -> None:
        """The instance's subnets: remembered in ``<state>/network.json`` so a restart keeps addresses;
        chosen the first time among candidates that overlap no route of the host."""
        saved = self.settings.state_dir / "network.json"
        try:
            data = json.loads(saved.read_text())
            self.subnet4 = ipaddress.IPv4Network(data["subnet4"])
            self.subnet6 = ipaddress.IPv6Network(data["subnet6"])
        except (OSError, ValueError, KeyError, TypeError):
            taken = self._host_routes()
            for candidate in self.config.default_subnet4(self.instance):
                if not any(candidate.overlaps(r) for r in taken):
                    self.subnet4 = candidate
                    break
            else:
                raise RuntimeFailure("every candidate sandbox subnet overlaps a route of this host; set "
                                     "SHOAL_NET_SUBNET to a free IPv4 subnet", "network") from None
            self.subnet6 = self.config.prefix6(self.instance)
            saved.write_text(json.dumps({"subnet4": str(self.subnet4), "subnet6": str(self.subnet6)}))
        self.gateway4 = str(self.subnet4.network_address + 1)
        self.gateway6 = str(self.subnet6.network_address + 1)
        self.max_slot = min(names.MAX_SLOT, self.subnet4.num_addresses - 4)

    def _host_routes(self) -> list[ipaddress.IPv4Network]:
        from pyroute2 import IPRoute

        out = []
        with IPRoute() as ipr:
            for r in ipr.get_routes(family=2, table=254):
                dst, length = r.get("RTA_DST"), r.get("dst_len")
                if dst and length:
                    out.append(ipaddress.IPv4Network(f"{dst}/{length}", strict=False))
        return out

    def _gateway_device(self) -> None:
        from pyroute2 import IPRoute

        name = names.gateway_device(self.instance)
        with IPRoute() as ipr:
            if not ipr.link_lookup(ifname=name):
                ipr.link("add", ifname=name, kind="bridge")  # no port: it only holds addresses
            idx = ipr.link_lookup(ifname=name)[0]
            have = {a.get("IFA_ADDRESS") for a in ipr.get_addr(index=idx)}
            if self.gateway4 not in have:
                ipr.addr("add", index=idx, address=self.gateway4, prefixlen=32)
            if self.gateway6 not in have:
                ipr.addr("add", index=idx, address=self.gateway6, prefixlen=128, flags=slotns.IFA_F_NODAD)
            ipr.link("set", index=idx, state="up")

    # --- slots --------------------------------------------------------------------------------
    def _paths(self, slot: int) -> tuple[Path, Path, Path]:
        return self.root / "slots" / str(slot), self.root / "ns" / str(slot), self.root / "sys" / str(slot)

    def addresses(self, slot: int) -> tuple[str, str]:
        return str(self.subnet4.network_address + 2 + slot), str(self.subnet6.network_address + 2 + slot)

    def _read_slots(self) -> dict[int, dict | None]:
        return self.owners.read_all()

    def _rules(self, slot: int, data: dict) -> SlotRules:
        ipv4, ipv6 = self.addresses(slot)
        online = bool(data.get("internet", True)) and self.config.internet if "sandbox" in data \
            else self.config.internet
        policy, limits = self.egress.rules_of(str(data["sandbox"])) if "sandbox" in data else (None, None)
        return SlotRules(names.veth(self.instance, slot), ipv4, ipv6, online, slot, policy,
                         *([limits.max_connections] if limits else []))

    def _rebuild_table(self) -> None:
        """The whole table from the slot files: restores every rule after a crash or a flush."""
        slots = self._read_slots()
        rules = [self._rules(n, d) for n, d in sorted(slots.items()) if d]
        nft.run(self.firewall.rebuild(rules) + self.peers.table_commands(self._members(slots)), "network rules")

    def _members(self, slots: dict[int, dict | None] | None = None) -> list[Member]:
        """Every sandbox in a private network, from the slot files (read now unless given)."""
        out = []
        for n, data in sorted((self._read_slots() if slots is None else slots).items()):
            nets, name = member_of(data)
            if nets:
                ipv4, ipv6 = self.addresses(n)
                out.append(Member(str(data["sandbox"]), names.veth(self.instance, n), ipv4, ipv6, nets, name))
        return out

    def _new_slot(self) -> int:
        """Reserve a slot number (O_EXCL on its file), make its namespace and rules; owned by this process'
        pool (``{"pool": [pid, start]}``) until ``claim`` hands it to a sandbox."""
        with self._locked():
            slot = self.owners.reserve(self.max_slot, owners.pool_owner())
        if slot is None:
            raise CapacityExceeded(f"no free address left in {self.subnet4}")
        _, ns, sysfs = self._paths(slot)
        ipv4, ipv6 = self.addresses(slot)
        try:
            slotns.make(ns, sysfs, names.veth(self.instance, slot), ipv4, ipv6, self.gateway4)
            with self._locked():
                nft.run(self.firewall.add_slot(self._rules(slot, {})), "network rules")
        except BaseException:
            self._free_slot(slot, lambda data: data == owners.pool_owner())
            raise
        return slot

    def _free_slot(self, slot: int, expect: Callable[[dict | None], bool]) -> bool:
        """Free ``slot`` if its owner file passes ``expect`` (checked under the lock, at the moment of
        taking it over): rules, veth, namespace, files. False, and nothing touched, if the slot is not the
        one the caller believed it to be any more: it was freed already, or freed and made again for
        someone else (a second release of one sandbox, a reconcile acting on files it read earlier)."""
        with self._locked():
            data = self.owners.take(slot, expect)
            if data is None:
                return False
            if "sandbox" in data:
                self._unlink_sandbox(str(data["sandbox"]), slot)
        self._dispose(slot, data)
        return True

    def _dispose(self, slot: int, data: dict) -> None:
        """Tear down a slot this process is ``freeing`` (so nobody else touches it), then give the number
        back. The kernel objects go first, outside the lock: the number stays taken until they are gone."""
        _, ns, sysfs = self._paths(slot)
        slotns.remove(ns, sysfs, names.veth(self.instance, slot))
        with self._locked():
            if self._ready:
                rules = self._rules(slot, data)
                try:
                    nft.run(self.firewall.remove_slot(SlotRules(rules.veth, rules.ipv4, rules.ipv6, True, slot)),
                            "network rules")
                except RuntimeFailure:
                    pass  # the table is gone or was rebuilt without it
                self._leave_networks(rules.veth, data)
            self.owners.drop(slot)

    def _leave_networks(self, veth: str, data: dict) -> None:
        """Remove the ``peers`` pairs of a slot being freed (its own batch: nothing else can fail it)."""
        nets, _ = member_of(data)
        if not nets:
            return
        try:
            nft.run(self.peers.leave(veth, nets, self._members()), "private network rules")
        except RuntimeFailure:
            pass  # the table is gone or was rebuilt without it (a rebuild reads the slot files)

    def _unlink_sandbox(self, sandbox_id: str, slot: int) -> None:
        """Remove ``sandboxes/<id>`` if it names ``slot`` (caller holds the lock)."""
        link = self.root / "sandboxes" / sandbox_id
        try:
            if os.readlink(link) == str(slot):
                os.unlink(link)
        except OSError:
            pass

    def _start_filler(self) -> None:
        if self.config.pool_size <= 0 or self._filler is not None:
            return
        self._filler = threading.Thread(target=self._fill, name="shoal-net-pool", daemon=True)
        self._filler.start()

    def _fill(self) -> None:
        while not self._closed:
            with self._pool_cv:
                while len(self._pool) >= self.config.pool_size and not self._closed:
                    self._pool_cv.wait()
                while self._pool and not self._closed:  # let the creates of a burst finish first
                    quiet = self._last_claim + REFILL_DELAY_S - time.monotonic()
                    if quiet <= 0:
                        break
                    self._pool_cv.wait(quiet)
            if self._closed:
                return
            refill.wait_between_creates()  # never beside a create of this process (shoal/refill.py)
            try:
                slot = self._new_slot()
            except Exception:  # noqa: BLE001 - full subnet or a transient failure: retry later
                time.sleep(1.0)
                continue
            with self._pool_cv:
                closed = self._closed
                if not closed:
                    self._pool.append(slot)
            if closed:
                self._free_slot(slot, self._in_my_pool)
                return

    @staticmethod
    def _in_my_pool(data: dict | None) -> bool:
        """Whether a slot's owner is this process' pool (not a parent's, for a forked child)."""
        return data == owners.pool_owner()

    # --- sandboxes ----------------------------------------------------------------------------
    def full(self) -> bool:
        """Whether this process's pool holds all its ready slots (``shoal bench`` waits for it)."""
        with self._pool_cv:
            return len(self._pool) >= self.config.pool_size

    def claim(self, sandbox_id: str, internet: bool = True, lower_dir: Path | None = None,
              networks: tuple[str, ...] = (), name: str | None = None, policy: EgressPolicy | None = None,
              limits: NetLimits | None = None) -> Lease:
        """Give ``sandbox_id`` a ready slot (made now if the pool is empty), in private ``networks`` (ids)
        under DNS ``name``: both are written in its slot file with the owner, and the peers' set elements
        added in the same locked step.

        The pool only remembers numbers: a pooled slot is handed over only if its file, under the lock,
        still names this process' pool. Anything else (a reconcile elsewhere took it, a forked child holds
        its parent's pool) is dropped from the pool, never handed out."""
        self.ensure()
        online = bool(internet) and self.config.internet
        owner = owners.sandbox_owner(sandbox_id, online)
        if policy is None and limits is None:  # a resume after a host reboot: what was stored still holds
            policy, limits = self.egress.files.load(sandbox_id) or (None, None)
        elif policy is not None or limits != NetLimits():  # stored before any rule names it (egress.py)
            self.egress.files.save(sandbox_id, policy or EgressPolicy(), limits or NetLimits())
        limits = limits or NetLimits()
        if networks:
            owner.update(networks=list(networks), name=name)
        while True:
            with self._pool_cv:
                slot = self._pool.popleft() if self._pool else None
                self._last_claim = time.monotonic()
                self._pool_cv.notify_all()
            if slot is None:
                slot = self._new_slot()
            try:
                with self._locked():
                    if not self._in_my_pool(self.owners.read(slot)):
                        continue  # not ours any more: try the next one
                    self.owners.write(slot, owner)
                    link = self.root / "sandboxes" / sandbox_id
                    if link.is_symlink():
                        link.unlink()
                    os.symlink(str(slot), link)
                    if not online and self.config.internet:
                        nft.run(self.firewall.set_online(names.veth(self.instance, slot), False), "network rules")
                    if (policy is not None and not policy.default) or limits != NetLimits():
                        nft.run(self.egress.commands(slot, policy, limits, True), "network policy")
                    if networks:
                        nft.run(self.peers.join(names.veth(self.instance, slot), tuple(networks), self._members()),
                                "private network rules")
                self.egress.shape(slot, limits)
            except BaseException:
                self._free_slot(slot, lambda data: data == owner or self._in_my_pool(data))
                raise
            return self.lease(sandbox_id, slot, online, lower_dir)

    def lease(self, sandbox_id: str, slot: int, online: bool, lower_dir: Path | None = None) -> Lease:
        self.ensure()  # a process that resumes a sandbox it did not create has not set up the host yet
        _, ns, sysfs = self._paths(slot)
        ipv4, ipv6 = self.addresses(slot)
        files = {"resolv.conf": f"nameserver {self.gateway4}\nsearch {SUFFIX}\noptions edns0\n"}
        ca = self.config.extra_ca()
        if ca:
            files[CA_BUNDLE_IN_SANDBOX] = self._template_ca(lower_dir) + ca.decode("ascii", "replace")
        return Lease(slot, names.veth(self.instance, slot), ipv4, ipv6, ns, sysfs, online, files,
                     self.config.sandbox_env())

    def _template_ca(self, lower_dir: Path | None) -> str:
        """The template's own CA bundle (its trust roots stay trusted), read once per template mount."""
        if lower_dir is None:
            return ""
        if lower_dir not in self._ca_cache:
            try:
                with open(lower_dir / TEMPLATE_CA, "rb") as f:
                    data = f.read(MAX_TEMPLATE_CA)
                text = data.decode("ascii", "replace")
                self._ca_cache[lower_dir] = text if text.endswith("\n") or not text else text + "\n"
            except OSError:
                self._ca_cache[lower_dir] = ""
        return self._ca_cache[lower_dir]

    def slot_of(self, sandbox_id: str) -> int | None:
        try:
            return int(os.readlink(self.root / "sandboxes" / sandbox_id))
        except (OSError, ValueError):
            return None

    def release(self, sandbox_id: str) -> None:
        """Free the sandbox's slot: veth, namespace, rules, files. A no-op if it has none, also when two
        callers release one sandbox at once (a delete beside ``check_health``, or two deletes): the slot
        is freed by the one whose compare-and-swap of its owner file wins, never again after its number
        went to another sandbox."""
        slot = self.slot_of(sandbox_id)
        if slot is None:
            return
        self.ensure()
        if not self._free_slot(slot, lambda data: isinstance(data, dict) and data.get("sandbox") == sandbox_id):
            with self._locked():  # a link left pointing at a slot that is not (or no longer) the sandbox's
                data = self.owners.read(slot)
                if not (isinstance(data, dict) and data.get("sandbox") == sandbox_id):
                    self._unlink_sandbox(sandbox_id, slot)

    def reconcile(self, live: Callable[[], Iterable[str]]) -> list[int]:
        """Free slots of sandboxes that are gone and of dead processes (pools, half-done frees), veths and
        namespaces with no slot file; then rebuild the table from what is left (restoring lost rules).

        ``live`` is called after the slot files are read: a sandbox is stored before it claims a slot, so a
        slot naming a sandbox the store lacks at that later moment is truly orphaned (given a set taken
        earlier, a create in another process between the two would lose its slot while it starts). Each
        slot is freed only if its file still says what was read (see ``_free_slot``)."""
        self.ensure()
        with self._locked():
            seen = self._read_slots()
        alive = set(live())
        freed = []
        for slot, data in seen.items():
            if data is None:
                try:
                    age = time.time() - os.stat(self._paths(slot)[0]).st_mtime
                except OSError:
                    continue
                if age < ORPHAN_GRACE_S:
                    continue  # another process is writing it right now
            elif "sandbox" in data:
                if data["sandbox"] in alive:
                    continue
            elif "pool" in data:
                if owners.process_alive(data["pool"]):
                    continue
            elif "freeing" in data:
                if owners.process_alive(data["freeing"]):
                    continue
            if self._free_slot(slot, lambda now, was=data: now == was):
                freed.append(slot)
        with self._locked():
            have = self._read_slots()
            stray = [n for n in slotns.host_links(names.veth_prefix(self.instance))
                     if names.slot_of(self.instance, n) not in have]
            slotns.delete_links(stray)
            for sub in ("ns", "sys"):
                for entry in os.scandir(self.root / sub):
                    if entry.name.isdigit() and int(entry.name) not in have:
                        slotns.remove(*self._orphan_paths(int(entry.name)))
            for entry in os.scandir(self.root / "sandboxes"):
                try:
                    owner = have.get(int(os.readlink(entry.path)))
                    if not isinstance(owner, dict) or owner.get("sandbox") != entry.name:
                        os.unlink(entry.path)
                except (OSError, ValueError):
                    os.unlink(entry.path)
            self.egress.files.sweep(alive, ORPHAN_GRACE_S)  # policies of sandboxes that are gone
            self._rebuild_table()
        return freed

    def _orphan_paths(self, slot: int) -> tuple[Path, Path, str]:
        _, ns, sysfs = self._paths(slot)
        return ns, sysfs, names.veth(self.instance, slot)

    def close(self) -> None:
        """Free this process' pool; if no slot of the instance is left, remove the table and gateway too."""
        self._closed = True
        with self._pool_cv:
            self._pool_cv.notify_all()
        if self._filler is not None and self._filler is not threading.current_thread():
            self._filler.join(timeout=10)  # a slot half-made now would outlive the check below
        with self._pool_cv:
            pool, self._pool = list(self._pool), collections.deque()
        for slot in pool:
            self._free_slot(slot, self._in_my_pool)
        if self._resolver is not None:
            self._resolver.close()
        if self._proxy is not None:
            self._proxy.close()
        if not self._ready:
            return
        with self._locked():
            if not self._read_slots():
                try:
                    nft.run(self.firewall.drop_table(), "network rules")
                except RuntimeFailure:
                    pass
                slotns.delete_links([names.gateway_device(self.instance)])
                try:
                    os.unlink(REGISTRY / self.instance)
                except OSError:
                    pass
        with Network._instances_lock:
            if Network._instances.get(self.instance) is self:
                del Network._instances[self.instance]


def sweep_dead_instances() -> list[str]:
    """Remove the table, gateway and veths of every instance whose run directory is gone."""
    swept = []
    try:
        entries = list(os.scandir(REGISTRY))
    except OSError:
        return swept
    for entry in entries:
        try:
            root = Path(Path(entry.path).read_text().strip())
        except OSError:
            continue
        if root.is_dir():
            continue
        instance = entry.name
        try:
            nft.run([{"add": {"table": {"family": "inet", "name": names.table(instance)}}},
                     {"delete": {"table": {"family": "inet", "name": names.table(instance)}}}], "network rules")
        except RuntimeFailure:
            continue
        slotns.delete_links(slotns.host_links(names.veth_prefix(instance)) + [names.gateway_device(instance)])
        try:
            os.unlink(entry.path)
        except OSError:
            pass
        swept.append(instance)
    return swept
