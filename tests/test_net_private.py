"""Private networks (issue 9 item 5): members reach each other by address and by name, TCP and UDP, IPv4
and IPv6; non-members cannot; networks are per API key; rm is refused while in use; delete, pause/resume
and a daemon SIGKILL keep the rules right. Real sandboxes, real nftables and DNS; traffic only between
sandboxes this module made (and loopback).
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Iterator

import httpx
import pytest

os.environ.pop("SHOAL_INTERNET", None)

from conftest import start_daemon, stop_daemon  # noqa: E402
from shoal.engine.engine import Engine  # noqa: E402
from shoal.errors import Conflict, NotFound  # noqa: E402
from shoal.net import nft, private_networks  # noqa: E402


def sh(engine: Engine, sid: str, script: str, timeout: float = 20) -> tuple[int, str]:
    res = engine.run(sid, ["sh", "-c", script], timeout=timeout)
    return res.exit_code, (res.stdout_bytes + res.stderr_bytes).decode(errors="replace").strip()


def serve(engine: Engine, sid: str, port: int) -> None:
    """A TCP server in ``sid`` (busybox nc) answering ``hi-<sid>`` on every address; waits until it listens."""
    sh(engine, sid, f"(nc -ll -p {port} -e echo hi-{sid} >/dev/null 2>&1 &)")
    wait_listening(engine, sid, port, "t")


def serve_udp(engine: Engine, sid: str, port: int) -> None:
    """A UDP server (python3, dual stack) in a ``base`` sandbox answering ``hi-<sid>`` to each datagram."""
    code = ("import socket\n"
            "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
            "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n"
            f"s.bind(('::', {port}))\n"
            "while True:\n"
            "    d, peer = s.recvfrom(100)\n"
            f"    s.sendto(b'hi-{sid}', peer)\n")
    engine.agent(sid).write_file("/tmp/udp_server.py", code.encode())
    sh(engine, sid, "(python3 /tmp/udp_server.py >/dev/null 2>&1 &)")
    wait_listening(engine, sid, port, "u")


def wait_listening(engine: Engine, sid: str, port: int, proto: str) -> None:
    deadline = time.monotonic() + 10
    files = "/proc/net/tcp /proc/net/tcp6" if proto == "t" else "/proc/net/udp /proc/net/udp6"
    while f":{port:04X} " not in sh(engine, sid, f"cat {files}")[1]:
        assert time.monotonic() < deadline, f"nothing listens on {proto} {port} in {sid}"
        time.sleep(0.05)


def tcp(engine: Engine, sid: str, host: str, port: int) -> str | None:
    code, out = sh(engine, sid, f"nc -w 2 {host} {port} </dev/null")
    return out if code == 0 and out else None


def udp(engine: Engine, sid: str, host: str, port: int) -> str | None:
    """The answer to one datagram from ``sid`` (a ``base`` sandbox) to ``host:port``, or None."""
    family = "AF_INET6" if ":" in host else "AF_INET"
    code, out = sh(engine, sid, f"python3 -c \"import socket; s = socket.socket(socket.{family}, socket.SOCK_DGRAM); "
                                f"s.settimeout(2); s.sendto(b'ping', ('{host}', {port})); "
                                "print(s.recv(100).decode())\"")
    return out if code == 0 and out else None


def peers_elements(engine: Engine) -> list:
    table = nft.list_table("inet", engine.network.firewall.table) or {}
    for item in table.get("nftables", []):
        s = item.get("set")
        if s and s.get("name") == private_networks.PEERS:
            return s.get("elem", [])
    return []


def veth_pairs(engine: Engine) -> set[tuple[str, str]]:
    return {tuple(e["concat"]) for e in peers_elements(engine)}


@pytest.fixture(scope="module")
def net_name(engine: Engine) -> Iterator[str]:
    name = "pn-" + secrets.token_hex(3)
    engine.private_networks.create(None, name)
    yield name
    for rec in engine.store.all():
        if name in rec.networks:
            engine.destroy(rec.id)
    engine.delete_network(name)


@pytest.fixture(scope="module")
def trio(engine: Engine, minimal_template: str, net_name: str) -> Iterator[tuple[str, str, str]]:
    """Two members (``a`` named ``alpha``, ``b`` named ``beta``) and one outsider ``c``."""
    made = []
    try:
        a = engine.create(minimal_template, networks=[net_name], name="alpha", wait=True).id
        made.append(a)
        b = engine.create(minimal_template, networks=[net_name], name="beta", wait=True).id
        made.append(b)
        c = engine.create(minimal_template, wait=True).id
        made.append(c)
        yield a, b, c
    finally:
        for sid in made:
            try:
                engine.destroy(sid)
            except NotFound:
                pass


def test_members_reach_each_other_by_address_tcp_v4_and_v6(engine: Engine, trio) -> None:
    a, b, c = trio
    rb = engine.get(b)
    assert engine.get(a).networks == rb.networks and rb.name == "beta"
    serve(engine, b, 7000)
    assert tcp(engine, a, rb.address, 7000) == f"hi-{b}"
    assert tcp(engine, a, rb.address6, 7000) == f"hi-{b}"


def test_members_reach_each_other_over_udp_v4_and_v6_outsider_does_not(engine: Engine, base_template: str,
                                                                       net_name: str) -> None:
    made = [engine.create(base_template, networks=[net_name] if i < 2 else None, wait=True).id for i in range(3)]
    try:
        a, b, c = made
        rb = engine.get(b)
        serve_udp(engine, b, 7001)
        assert udp(engine, a, rb.address, 7001) == f"hi-{b}"
        assert udp(engine, a, rb.address6, 7001) == f"hi-{b}"
        assert udp(engine, c, rb.address, 7001) is None
        assert udp(engine, c, rb.address6, 7001) is None
    finally:
        for sid in made:
            engine.destroy(sid)


def test_non_member_is_refused(engine: Engine, trio) -> None:
    a, b, c = trio
    rb, rc = engine.get(b), engine.get(c)
    serve(engine, b, 7010)
    assert tcp(engine, a, rb.address, 7010) == f"hi-{b}"  # control: the server answers members
    assert tcp(engine, c, rb.address, 7010) is None
    assert tcp(engine, c, rb.address6, 7010) is None
    serve(engine, c, 7011)  # nor can a member reach the outsider
    assert tcp(engine, a, rc.address, 7011) is None


def test_members_resolve_each_other_by_id_and_name_outsiders_do_not(engine: Engine, trio) -> None:
    a, b, c = trio
    rb = engine.get(b)
    for name in (f"beta.{private_networks.SUFFIX}", f"{b}.{private_networks.SUFFIX}", "beta"):
        code, out = sh(engine, a, f"nslookup {name}")
        assert code == 0 and rb.address in out and rb.address6 in out, (name, out)
    serve(engine, b, 7020)
    assert tcp(engine, a, "beta", 7020) == f"hi-{b}"
    for name in (f"beta.{private_networks.SUFFIX}", f"{b}.{private_networks.SUFFIX}"):
        code, out = sh(engine, c, f"nslookup {name}")
        assert rb.address not in out, out
        assert "NXDOMAIN" in out or code != 0, out


def test_rm_refused_while_in_use_and_names_are_per_key(engine: Engine, trio, net_name: str) -> None:
    with pytest.raises(Conflict):
        engine.delete_network(net_name)
    with pytest.raises(Conflict):
        engine.private_networks.create(None, net_name)
    other = engine.keys.create("pn-other-" + secrets.token_hex(2))[0]
    try:
        assert engine.private_networks.names(other.id) == {}  # another key sees none of ours
        with pytest.raises(NotFound):
            engine.create("minimal", networks=[net_name], api_key=other)
    finally:
        engine.keys.revoke(other.id)


def test_taken_name_is_refused(engine: Engine, trio, net_name: str) -> None:
    with pytest.raises(Conflict):
        engine.create("minimal", networks=[net_name], name="alpha")


def test_pause_resume_keeps_addresses_and_membership(engine: Engine, minimal_template: str, net_name: str) -> None:
    a = engine.create(minimal_template, networks=[net_name], wait=True).id
    b = engine.create(minimal_template, networks=[net_name], wait=True).id
    try:
        before = engine.get(b)
        engine.pause(b, mode="filesystem")
        engine.resume(b)
        after = engine.get(b)
        assert (after.address, after.address6) == (before.address, before.address6)
        engine.agent(b).wait_ready()
        serve(engine, b, 7030)
        assert tcp(engine, a, after.address, 7030) == f"hi-{b}"
    finally:
        engine.destroy(a)
        engine.destroy(b)


def test_delete_removes_membership_rules(engine: Engine, minimal_template: str, net_name: str) -> None:
    a = engine.create(minimal_template, networks=[net_name], wait=True).id
    b = engine.create(minimal_template, networks=[net_name], wait=True).id
    va, vb = (engine.network.lease(s, engine.network.slot_of(s), True).veth for s in (a, b))
    assert {(va, vb), (vb, va)} <= veth_pairs(engine)
    engine.destroy(b)
    assert not any(vb in p for p in veth_pairs(engine))
    engine.destroy(a)
    assert not any(va in p for p in veth_pairs(engine))


def test_reconcile_restores_lost_membership_rules(engine: Engine, minimal_template: str, net_name: str) -> None:
    """A crash (or ``nft flush``) loses the table: reconcile rebuilds the pairs from the slot files."""
    a = engine.create(minimal_template, networks=[net_name], wait=True).id
    b = engine.create(minimal_template, networks=[net_name], wait=True).id
    try:
        va, vb = (engine.network.lease(s, engine.network.slot_of(s), True).veth for s in (a, b))
        nft.run(engine.network.firewall.drop_table(), "test: lose the table")
        assert not veth_pairs(engine)
        engine.reconcile()
        assert {(va, vb), (vb, va)} <= veth_pairs(engine)
        serve(engine, b, 7040)
        assert tcp(engine, a, engine.get(b).address, 7040) == f"hi-{b}"
    finally:
        engine.destroy(a)
        engine.destroy(b)


def test_daemon_sigkill_restart_keeps_members_then_delete_leaves_nothing(engine: Engine) -> None:
    d = start_daemon()
    h = {"Authorization": f"Bearer {d.key}"}
    name = "pk-" + secrets.token_hex(3)
    try:
        assert httpx.post(d.url + "/v1/networks", headers=h, json={"name": name}).status_code == 201
        ids = [httpx.post(d.url + "/v1/sandboxes", headers=h, timeout=60,
                          json={"template": "minimal", "networks": [name], "name": f"m{i}"}).json()["id"]
               for i in range(2)]
        d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        nft.run(engine.network.firewall.drop_table(), "test: a crash lost the table")
        d = start_daemon()  # its start-up reconcile rebuilds the table from the slot files
        h = {"Authorization": f"Bearer {d.key}"}
        veths = {engine.network.lease(s, engine.network.slot_of(s), True).veth for s in ids}
        assert {(x, y) for x in veths for y in veths if x != y} <= veth_pairs(engine)
        serve(engine, ids[1], 7050)
        assert tcp(engine, ids[0], "m1", 7050) == f"hi-{ids[1]}"
        for sid in ids:
            assert httpx.delete(d.url + f"/v1/sandboxes/{sid}", headers=h, timeout=60).status_code == 204
        assert not any(v in p for p in veth_pairs(engine) for v in veths)
        assert all(engine.network.slot_of(s) is None for s in ids)
        assert httpx.delete(d.url + f"/v1/networks/{name}", headers=h).status_code == 204
    finally:
        stop_daemon(d)
