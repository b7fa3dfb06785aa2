"""One slot's kernel objects: a network namespace, a veth pair into it, addresses and routes.

Made through netlink (pyroute2) from one thread, never by spawning ``ip``: the thread unshares a new
network namespace, pins it with a bind mount (so it outlives the thread and a daemon crash), mounts a
sysfs that belongs to it, and opens a netlink socket inside it; then it returns to the host's namespace
and opens one there. A netlink socket stays bound to the namespace it was opened in, so both sides are
configured from the same thread.

The namespace is owned by the host's user namespace, not the sandbox's: sandbox root holds no
capability over it (it cannot add an address, a route or a raw socket there). The kernel lets only
an owner of the namespace mount its sysfs, so crun would fall back to the host's ``/sys`` (the host's
interfaces); the sysfs mounted here, from inside the namespace, is the sandbox's own, bind-mounted by
the OCI config in place of crun's.

Routed, not bridged: the sandbox has ``ipv4/32`` and ``ipv6/128`` on ``eth0``, a default route via
the gateway (IPv4 on-link, IPv6 via ``fe80::1``, the host side's fixed link-local address); the host
routes each address to its veth and holds the gateway addresses on one port-less bridge.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
from pathlib import Path

from shoal.runtime.linux import mounts

CLONE_NEWNET = 0x40000000
IFA_F_NODAD = 0x02
MS_NOEXEC = 8
HOST_LINK_LOCAL = "fe80::1"


_libc = ctypes.CDLL(None, use_errno=True)


def _check(rc: int) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError:
        pass  # a missing knob (IPv6 disabled) must not stop IPv4


def _in_thread(fn, *args):  # noqa: ANN001, ANN202 - a private helper for the namespace dance
    """Run ``fn`` on a fresh thread: ``unshare``/``setns`` change the calling thread's namespace, and a
    thread that fails to return to the host's namespace must not be one the daemon reuses."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc
    t = threading.Thread(target=target, name="shoal-netns", daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")


def make(ns_file: Path, sys_dir: Path, host_if: str, ipv4: str, ipv6: str, gw4: str) -> None:
    """Create and fully configure a slot; on failure, undo what was made and raise."""
    try:
        _in_thread(_make, ns_file, sys_dir, host_if, ipv4, ipv6, gw4)
    except BaseException:
        remove(ns_file, sys_dir, host_if)
        raise


def _make(ns_file: Path, sys_dir: Path, host_if: str, ipv4: str, ipv6: str, gw4: str) -> None:
    from pyroute2 import IPRoute  # 0.3 s to import: only ever on the pool's thread or at setup

    host_ns = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_libc.unshare(CLONE_NEWNET))  # Python 3.11 has no os.unshare
        try:
            ns_file.touch(mode=0o600)
            mounts.mount("/proc/thread-self/ns/net", ns_file, "", mounts.MS_BIND)
            sys_dir.mkdir(mode=0o755, exist_ok=True)
            mounts.mount("sysfs", sys_dir, "sysfs", mounts.MS_NOSUID | mounts.MS_NODEV | MS_NOEXEC
                         | mounts.MS_RDONLY)
            for conf in ("default", "all"):  # no duplicate address detection: addresses usable at once
                _write(f"/proc/sys/net/ipv6/conf/{conf}/accept_dad", "0")
                _write(f"/proc/sys/net/ipv6/conf/{conf}/accept_ra", "0")
            inner = IPRoute()
        finally:
            _check(_libc.setns(host_ns, CLONE_NEWNET))
    finally:
        os.close(host_ns)
    outer = IPRoute()
    try:
        ns_fd = os.open(ns_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            outer.link("add", ifname=host_if, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns_fd})
        finally:
            os.close(ns_fd)
        host_idx = outer.link_lookup(ifname=host_if)[0]
        _write(f"/proc/sys/net/ipv6/conf/{host_if}/addr_gen_mode", "1")  # only fe80::1, no DAD'd extra
        _write(f"/proc/sys/net/ipv6/conf/{host_if}/accept_ra", "0")
        outer.addr("add", index=host_idx, address=HOST_LINK_LOCAL, prefixlen=64, flags=IFA_F_NODAD)
        outer.link("set", index=host_idx, state="up")
        outer.route("add", dst=f"{ipv4}/32", oif=host_idx)
        outer.route("add", dst=f"{ipv6}/128", oif=host_idx, family=socket.AF_INET6)

        lo = inner.link_lookup(ifname="lo")[0]
        eth = inner.link_lookup(ifname="eth0")[0]
        inner.link("set", index=lo, state="up")
        inner.addr("add", index=eth, address=ipv4, prefixlen=32)
        inner.addr("add", index=eth, address=ipv6, prefixlen=128, flags=IFA_F_NODAD)
        inner.link("set", index=eth, state="up")
        inner.route("add", dst=f"{gw4}/32", oif=eth, scope=253)  # RT_SCOPE_LINK: the gateway is on-link
        inner.route("add", dst="0.0.0.0/0", gateway=gw4, oif=eth)
        inner.route("add", dst="::/0", gateway=HOST_LINK_LOCAL, oif=eth, family=socket.AF_INET6)
    finally:
        outer.close()
        inner.close()


def remove(ns_file: Path, sys_dir: Path, host_if: str) -> None:
    """Undo ``make``; each step tolerates being already done. Deleting the host side takes the sandbox
    side with it at once (waiting for the namespace to die would leave the name taken for a while)."""
    delete_links([host_if])
    for target in (sys_dir, ns_file):
        try:
            mounts.umount(target)
        except OSError:
            pass
    for fn, target in ((os.rmdir, sys_dir), (os.unlink, ns_file)):
        try:
            fn(target)
        except OSError:
            pass


def delete_links(ifnames: list[str]) -> None:
    if not ifnames:
        return
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        for name in ifnames:
            idx = ipr.link_lookup(ifname=name)
            if idx:
                try:
                    ipr.link("del", index=idx[0])
                except Exception:  # noqa: BLE001 - already gone (its namespace died first)
                    pass


def host_links(prefix: str) -> list[str]:
    """Names of the host's interfaces that start with ``prefix`` (from sysfs: no netlink needed)."""
    try:
        return [n for n in os.listdir("/sys/class/net") if n.startswith(prefix)]
    except OSError:
        return []
