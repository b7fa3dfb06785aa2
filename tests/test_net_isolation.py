"""Sandbox networking (shoal.net): an address, DNS through Shoal's resolver, the internet through NAT
when allowed, and the safe defaults. Real sandboxes, real nftables, no mocks.

"The internet" here is a test host: a network namespace this module makes, routed from the host
(198.51.100.0/24, 2001:db8:51::/64), with an echo server (it answers with the peer's address, so NAT
shows) and a DNS server (dnslib) that Shoal's resolver is pointed at (SHOAL_DNS_UPSTREAM, set before the
engine starts). Traffic goes only to loopback, the host itself and namespaces made here.
"""

from __future__ import annotations

import ctypes
import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

TEST_HOST4, HOST_SIDE4 = "198.51.100.10", "198.51.100.1"
TEST_HOST6, HOST_SIDE6 = "2001:db8:51::10", "2001:db8:51::1"
TEST_DNS = "198.51.100.53"
METADATA = "169.254.169.254"
ECHO_PORT = 8080
#: What the test DNS server answers (name -> (A, AAAA)); other test modules add their names.
DNS_NAMES = {"test-host.example": (TEST_HOST4, TEST_HOST6)}
os.environ["SHOAL_DNS_UPSTREAM"] = TEST_DNS  # before any Engine of this run reads its network config
os.environ.pop("SHOAL_INTERNET", None)

from shoal.engine.engine import Engine  # noqa: E402
from shoal.net import names  # noqa: E402

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _in_netns(ns: str, fn: Callable[[], object]) -> object:
    """Run ``fn`` on a thread inside network namespace ``ns`` (sockets made there stay there)."""
    box: dict = {}

    def target() -> None:
        fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
        try:
            assert _libc.setns(fd, CLONE_NEWNET) == 0
            box["v"] = fn()
        finally:
            os.close(fd)
    t = threading.Thread(target=target)
    t.start()
    t.join()
    return box["v"]


def _echo_peer(listener: socket.socket) -> None:
    while True:
        try:
            conn, peer = listener.accept()
        except OSError:
            return
        with conn:
            conn.sendall(peer[0].removeprefix("::ffff:").encode() + b"\n")


def _dns(sock: socket.socket) -> None:
    from dnslib import AAAA, QTYPE, RR, A, DNSRecord
    while True:
        try:
            data, peer = sock.recvfrom(4096)
        except OSError:
            return
        q = DNSRecord.parse(data)
        reply = q.reply()
        name = str(q.q.qname).rstrip(".")
        if name in DNS_NAMES and q.q.qtype == QTYPE.A:
            reply.add_answer(RR(q.q.qname, QTYPE.A, rdata=A(DNS_NAMES[name][0]), ttl=60))
        elif name in DNS_NAMES and q.q.qtype == QTYPE.AAAA:
            reply.add_answer(RR(q.q.qname, QTYPE.AAAA, rdata=AAAA(DNS_NAMES[name][1]), ttl=60))
        sock.sendto(reply.pack(), peer)


@pytest.fixture(scope="module")
def test_host() -> Iterator[str]:
    """The stand-in for the internet: a namespace with an echo server on every address (incl. the
    metadata address, routed there too) and a DNS server, reached from the host by a route."""
    tag = secrets.token_hex(3)
    ns, outer = f"shoaltest-{tag}", f"tnh{tag}"
    ip("netns", "add", ns)
    try:
        ip("link", "add", outer, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("addr", "add", f"{HOST_SIDE4}/24", "dev", outer)
        ip("-6", "addr", "add", f"{HOST_SIDE6}/64", "dev", outer, "nodad")
        ip("link", "set", outer, "up")
        for args in (("addr", "add", f"{TEST_HOST4}/24", "dev", "eth0"),
                     ("-6", "addr", "add", f"{TEST_HOST6}/64", "dev", "eth0", "nodad"),
                     ("addr", "add", f"{METADATA}/32", "dev", "lo"), ("addr", "add", f"{TEST_DNS}/32", "dev", "lo"),
                     ("link", "set", "eth0", "up"), ("link", "set", "lo", "up"),
                     ("route", "add", "default", "via", HOST_SIDE4),
                     ("-6", "route", "add", "default", "via", HOST_SIDE6)):
            ip("-n", ns, *args)
        ip("route", "add", f"{METADATA}/32", "via", TEST_HOST4)
        ip("route", "add", f"{TEST_DNS}/32", "via", TEST_HOST4)

        def listen() -> tuple[socket.socket, socket.socket]:
            tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            tcp.bind(("::", ECHO_PORT))
            tcp.listen(64)
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((TEST_DNS, 53))
            return tcp, udp
        tcp, udp = _in_netns(ns, listen)  # type: ignore[misc]
        threading.Thread(target=_echo_peer, args=(tcp,), daemon=True).start()
        threading.Thread(target=_dns, args=(udp,), daemon=True).start()
        yield ns
        tcp.close()
        udp.close()
    finally:
        for dst in (METADATA, TEST_DNS):
            subprocess.run(["ip", "route", "del", f"{dst}/32"], capture_output=True)
        subprocess.run(["ip", "link", "del", outer], capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def sh(engine: Engine, sid: str, script: str) -> tuple[int, str]:
    res = engine.run(sid, ["sh", "-c", script], timeout=20)
    return res.exit_code, (res.stdout_bytes + res.stderr_bytes).decode(errors="replace").strip()


def reach(engine: Engine, sid: str, host: str, port: int = ECHO_PORT, source: str | None = None) -> str | None:
    """What the echo server saw as our address, or None if the connection failed."""
    src = f"-s {source} " if source else ""
    code, out = sh(engine, sid, f"nc -w 2 {src}{host} {port} </dev/null")
    return out.splitlines()[-1] if code == 0 and out else None


def test_sandbox_has_addresses_and_resolves_through_shoal(engine: Engine, new_sandbox, test_host: str) -> None:
    sid = new_sandbox()
    rec = engine.get(sid)
    assert rec.address and rec.address6 and rec.internet is True
    code, out = sh(engine, sid, "ip -o addr show dev eth0; cat /etc/resolv.conf")
    assert code == 0 and rec.address in out and rec.address6 in out
    assert f"nameserver {engine.network.gateway4}" in out
    code, out = sh(engine, sid, "nslookup test-host.example")
    assert code == 0 and TEST_HOST4 in out, out
    assert sh(engine, sid, "ls /sys/class/net")[1].split() == ["eth0", "lo"]  # its own sysfs, not the host's


def test_internet_through_nat_ipv4_and_ipv6(engine: Engine, new_sandbox, test_host: str) -> None:
    sid = new_sandbox()
    assert reach(engine, sid, TEST_HOST4) == HOST_SIDE4  # masqueraded to the host's address
    assert reach(engine, sid, TEST_HOST6) == HOST_SIDE6


def test_no_internet_per_sandbox(engine: Engine, minimal_template: str, test_host: str) -> None:
    rec = engine.create(minimal_template, internet=False, wait=True)
    try:
        assert rec.internet is False and engine.get(rec.id).internet is False
        assert reach(engine, rec.id, TEST_HOST4) is None
        assert reach(engine, rec.id, TEST_HOST6) is None
        code, out = sh(engine, rec.id, "nslookup test-host.example")  # DNS still answers
        assert code == 0 and TEST_HOST4 in out
    finally:
        engine.destroy(rec.id)


def test_host_metadata_and_other_sandboxes_unreachable(engine: Engine, new_sandbox, test_host: str) -> None:
    a, b = new_sandbox(), new_sandbox()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("0.0.0.0", 0))
    listener.listen(8)
    threading.Thread(target=_echo_peer, args=(listener,), daemon=True).start()
    port = listener.getsockname()[1]
    host_addr = subprocess.run(["ip", "-4", "-o", "route", "get", "1.1.1.1"], capture_output=True,
                               text=True).stdout.split(" src ")[1].split()[0]  # a lookup, no traffic
    try:
        with socket.create_connection((host_addr, port), timeout=2) as c:  # control: the listener works
            assert c.recv(64)
        with socket.create_connection((METADATA, ECHO_PORT), timeout=2) as c:  # routed to the test host
            assert c.recv(64)
        for target in (engine.network.gateway4, host_addr):
            assert reach(engine, a, target, port) is None, target
        assert reach(engine, a, METADATA) is None
        # b listens on its own address; a cannot reach it, b itself can
        sh(engine, b, "(nc -l -p 9000 -e echo hi &) ; sleep 0.2")
        b_addr = engine.get(b).address
        assert sh(engine, a, f"nc -w 2 {b_addr} 9000 </dev/null")[0] != 0
        assert sh(engine, b, f"nc -w 2 {b_addr} 9000 </dev/null") == (0, "hi")
    finally:
        listener.close()


def test_spoofed_source_is_dropped(engine: Engine, new_sandbox, test_host: str) -> None:
    sid = new_sandbox()
    slot = engine.network.slot_of(sid)
    spoof = str(engine.network.subnet4.network_address + engine.network.subnet4.num_addresses - 2)
    # The sandbox cannot add an address (its namespace belongs to the host); the test does, as root would.
    subprocess.run(["nsenter", f"--net={engine.network.root}/ns/{slot}", "ip", "addr", "add", f"{spoof}/32",
                    "dev", "eth0"], check=True)
    assert reach(engine, sid, TEST_HOST4) == HOST_SIDE4
    assert reach(engine, sid, TEST_HOST4, source=spoof) is None


def test_pause_resume_keeps_address(engine: Engine, new_sandbox, test_host: str) -> None:
    sid = new_sandbox()
    before = engine.get(sid).address
    engine.pause(sid)
    engine.resume(sid)
    assert engine.get(sid).address == before
    assert reach(engine, sid, TEST_HOST4) == HOST_SIDE4


def _leftovers(engine: Engine, slot: int) -> list[str]:
    net = engine.network
    veth = names.veth(engine.settings.instance, slot)
    table = subprocess.run(["nft", "list", "table", "inet", names.table(engine.settings.instance)],
                           capture_output=True, text=True).stdout
    found = [p for p in (Path(f"/sys/class/net/{veth}"), net.root / "ns" / str(slot), net.root / "sys" / str(slot),
                         net.root / "slots" / str(slot)) if p.exists()]
    return [str(p) for p in found] + ([f"nft element {veth}"] if f'"{veth}"' in table else [])


def test_delete_leaves_nothing(engine: Engine, minimal_template: str) -> None:
    rec = engine.create(minimal_template, wait=True)
    slot = engine.network.slot_of(rec.id)
    assert slot is not None and _leftovers(engine, slot)  # all there while it runs
    engine.destroy(rec.id)
    assert _leftovers(engine, slot) == []
    assert engine.network.slot_of(rec.id) is None
