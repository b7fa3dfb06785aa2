"""Egress policy and limits (shoal.net.policy, firewall, egress_proxy, shaping): real sandboxes, real
nftables, tc and the real egress proxy; no mocks.

"The internet" is test_net_isolation's test host (a namespace made by the test, routed from the host,
reached through NAT) with more servers started inside it here, and its DNS server answering the names
added to ``DNS_NAMES``. Traffic goes only to loopback, the host and namespaces the tests made.
"""

from __future__ import annotations

import base64
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from shoal.engine.engine import Engine
from shoal.net import names
from test_net_isolation import (  # noqa: F401 - test_host is a fixture
    DNS_NAMES,
    HOST_SIDE4,
    TEST_HOST4,
    TEST_HOST6,
    _in_netns,
    ip,
    reach,
    sh,
    test_host,
)

OTHER4 = "198.51.100.11"  # a second address of the test host, for allow/deny by CIDR
HTTP_PORT, TLS_PORT, SINK_PORT, SOURCE_PORT, HOLD_PORT = 80, 443, 9100, 9101, 9102
DNS_NAMES.update({"allowed.example": (TEST_HOST4, TEST_HOST6), "other.example": (TEST_HOST4, TEST_HOST6),
                  "inject.example": (TEST_HOST4, TEST_HOST6)})
SECRET = "s3cret-token-never-in-the-sandbox"
PAYLOAD = 3_000_000
pytestmark = pytest.mark.usefixtures("test_host")


class Servers:
    """Servers inside the test host: HTTP that echoes the request head, a "TLS" port that answers
    REACHED to whatever arrives, a sink and a source for throughput, and a holder that counts connections."""

    def __init__(self) -> None:
        self.held: list[socket.socket] = []
        self.sink_seconds: list[float] = []

    def start(self, ns: str) -> None:
        def listen(port: int) -> socket.socket:
            s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("::", port))
            s.listen(64)
            return s
        self.socks = _in_netns(ns, lambda: [listen(p) for p in (HTTP_PORT, TLS_PORT, SINK_PORT, SOURCE_PORT,
                                                                 HOLD_PORT)])
        for sock, fn in zip(self.socks, (self._http, self._tls, self._sink, self._source, self._hold), strict=True):
            threading.Thread(target=self._loop, args=(sock, fn), daemon=True).start()

    @staticmethod
    def _loop(sock: socket.socket, fn) -> None:  # noqa: ANN001
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            threading.Thread(target=fn, args=(conn,), daemon=True).start()

    @staticmethod
    def _http(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            body = b"REACHED-HTTP\n" + data.split(b"\r\n\r\n")[0].lower()
            conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    @staticmethod
    def _tls(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            if conn.recv(16384):
                conn.sendall(b"REACHED-TLS\n")

    def _sink(self, conn: socket.socket) -> None:
        with conn:
            start, total = time.monotonic(), 0
            while chunk := conn.recv(65536):
                total += len(chunk)
            if total >= PAYLOAD:
                self.sink_seconds.append(time.monotonic() - start)

    @staticmethod
    def _source(conn: socket.socket) -> None:
        with conn:
            try:
                conn.sendall(b"x" * PAYLOAD)
            except OSError:
                pass

    def _hold(self, conn: socket.socket) -> None:
        self.held.append(conn)


@pytest.fixture(scope="module")
def servers(test_host: str) -> Iterator[Servers]:  # noqa: F811 - the fixture, imported above
    ip("-n", test_host, "addr", "add", f"{OTHER4}/24", "dev", "eth0")
    s = Servers()
    s.start(test_host)
    yield s
    for sock in s.socks + s.held:
        sock.close()


@pytest.fixture
def create(engine: Engine, minimal_template: str) -> Iterator:
    made: list[str] = []

    def make(**kwargs: object) -> str:
        rec = engine.create(minimal_template, wait=True, **kwargs)
        made.append(rec.id)
        return rec.id
    yield make
    for sid in made:
        try:
            engine.destroy(sid)
        except Exception:  # noqa: BLE001 - already gone
            pass


def wget(engine: Engine, sid: str, url: str) -> tuple[int, str]:
    """GET ``url`` (http://name/) with busybox nc (its wget crashes in the minimal template)."""
    name = url.split("/")[2]
    code, out = sh(engine, sid, f"printf 'GET / HTTP/1.0\\r\\nHost: {name}\\r\\n\\r\\n' | nc -w 5 {name} 80")
    return (code if " 200 " in out.split("\n")[0] else 1), out


def client_hello(name: str) -> bytes:
    """The first flight of a real TLS client for ``name`` (made on the host: the sandbox sends the bytes)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def tls_reaches(engine: Engine, sid: str, name: str) -> bool:
    hello = base64.b64encode(client_hello(name)).decode()
    code, out = sh(engine, sid, f"(echo {hello} | base64 -d; sleep 2) | nc -w 3 {name} {TLS_PORT}")
    return "REACHED-TLS" in out


def table(engine: Engine) -> str:
    return subprocess.run(["nft", "list", "table", "inet", names.table(engine.settings.instance)],
                          capture_output=True, text=True).stdout


def test_allow_and_deny_cidrs_allow_wins(engine: Engine, create, servers: Servers) -> None:
    sid = create(egress={"deny_out": ["0.0.0.0/0"], "allow_out": [TEST_HOST4]})
    assert reach(engine, sid, TEST_HOST4) == HOST_SIDE4  # allowed beats the deny of everything
    assert reach(engine, sid, OTHER4) is None
    assert reach(engine, sid, TEST_HOST6) is None  # E2B's all-traffic denies IPv6 too
    sid = create(egress={"deny_out": [f"{OTHER4}/32", "2001:db8:51::/64"]})
    assert reach(engine, sid, TEST_HOST4) == HOST_SIDE4  # what no list names stays allowed
    assert reach(engine, sid, OTHER4) is None
    assert reach(engine, sid, TEST_HOST6) is None


def test_update_running_sandbox_and_deny_all(engine: Engine, create, servers: Servers) -> None:
    sid = create()
    assert reach(engine, sid, TEST_HOST4) == HOST_SIDE4
    assert engine.update_network(sid, {"deny_out": ["0.0.0.0/0"]})["deny_out"] == ["0.0.0.0/0", "::/0"]
    assert reach(engine, sid, TEST_HOST4) is None and reach(engine, sid, TEST_HOST6) is None
    engine.update_network(sid, {"deny_out": ["0.0.0.0/0"], "allow_out": [OTHER4]})
    assert reach(engine, sid, OTHER4) == HOST_SIDE4 and reach(engine, sid, TEST_HOST4) is None
    engine.update_network(sid, {})  # back to allow-all: the sandbox's chain and sets are gone
    assert reach(engine, sid, TEST_HOST4) == HOST_SIDE4
    assert f"eg_{engine.network.slot_of(sid)} " not in table(engine)


def test_domain_allow_list_checks_host_and_sni(engine: Engine, create, servers: Servers) -> None:
    """other.example has the same address as allowed.example: after allowed.example resolved (its address
    admitted), other.example is still refused on 80 (Host) and 443 (SNI)."""
    sid = create(egress={"deny_out": ["0.0.0.0/0"], "allow_out": ["allowed.example"]})
    code, out = wget(engine, sid, "http://allowed.example/")
    assert code == 0 and "REACHED-HTTP" in out and "host: allowed.example" in out, out
    code, out = wget(engine, sid, "http://other.example/")
    assert code != 0 and "REACHED" not in out, out
    request = "printf 'GET / HTTP/1.0\\r\\nHost: other.example\\r\\n\\r\\n'"
    code, out = sh(engine, sid, f"{request} | nc -w 3 {TEST_HOST4} 80")  # straight to the shared address
    assert "403" in out and "other.example is not an allowed name" in out, out
    assert tls_reaches(engine, sid, "allowed.example")
    assert not tls_reaches(engine, sid, "other.example")
    assert reach(engine, sid, OTHER4) is None  # never resolved for an allowed name


def test_header_injection_for_plain_http(engine: Engine, create, servers: Servers) -> None:
    sid = create(egress={"rules": {"inject.example": [{"transform": {"headers": {"X-Shoal-Token": SECRET}}}]}})
    code, out = wget(engine, sid, "http://inject.example/")
    assert code == 0 and f"x-shoal-token: {SECRET}" in out, out
    code, out = wget(engine, sid, "http://allowed.example/")  # another name: nothing added
    assert code == 0 and "x-shoal-token" not in out
    assert SECRET not in sh(engine, sid, "env; cat /etc/* 2>/dev/null")[1]
    assert not tls_reaches(engine, sid, "inject.example")  # HTTPS would need TLS interception: refused


def test_delete_leaves_no_policy_behind(engine: Engine, minimal_template: str, servers: Servers) -> None:
    rec = engine.create(minimal_template, wait=True,
                        egress={"deny_out": ["0.0.0.0/0"], "allow_out": ["allowed.example"]},
                        net_limits={"max_connections": 5, "ingress_mbit": 50})
    slot = engine.network.slot_of(rec.id)
    sh(engine, rec.id, "nslookup allowed.example")
    before = table(engine)
    assert all(f"{n}_{slot} " in before for n in ("eg", "px", "cap", "a4", "n4", "d6")), before
    assert engine.network.egress.files.load(rec.id) is not None
    engine.destroy(rec.id)
    after = table(engine)
    assert not [n for n in ("eg", "px", "cap", "a4", "a6", "d4", "d6", "n4", "n6") if f"{n}_{slot} " in after]
    assert f'"{names.veth(engine.settings.instance, slot)}"' not in after
    assert engine.network.egress.files.load(rec.id) is None


def test_bandwidth_limit_roughly_holds(engine: Engine, create, servers: Servers) -> None:
    """8 Mbit/s each way: 3 MB takes ~3 s; it must not go faster than twice the limit."""
    sid = create(net_limits={"egress_mbit": 8, "ingress_mbit": 8})
    start = time.monotonic()
    code, out = sh(engine, sid, f"nc -w 10 {TEST_HOST4} {SOURCE_PORT} </dev/null | wc -c")
    elapsed = time.monotonic() - start
    assert code == 0 and int(out.split()[-1]) == PAYLOAD, out
    assert PAYLOAD * 8 / elapsed < 2 * 8_000_000, f"into the sandbox at {PAYLOAD * 8 / elapsed / 1e6:.1f} Mbit/s"
    code, _ = sh(engine, sid, f"head -c {PAYLOAD} /dev/zero | nc -w 10 {TEST_HOST4} {SINK_PORT}")
    deadline = time.monotonic() + 10
    while not servers.sink_seconds and time.monotonic() < deadline:
        time.sleep(0.05)
    assert servers.sink_seconds, "the sink got nothing"
    rate = PAYLOAD * 8 / servers.sink_seconds[-1]
    assert rate < 2 * 8_000_000, f"out of the sandbox at {rate / 1e6:.1f} Mbit/s"


def test_connection_cap(engine: Engine, create, servers: Servers) -> None:
    sid = create(net_limits={"max_connections": 3})
    servers.held.clear()
    sh(engine, sid, f"for i in 1 2 3; do (sleep 60 | nc {TEST_HOST4} {HOLD_PORT} >/dev/null &); done")
    deadline = time.monotonic() + 15
    while len(servers.held) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(servers.held) == 3
    code, _ = sh(engine, sid, f"nc -w 2 {TEST_HOST4} {HOLD_PORT} </dev/null")
    assert code != 0 and len(servers.held) == 3  # the fourth is dropped
    assert sh(engine, sid, "nslookup allowed.example")[0] == 0  # DNS does not count


def test_rest_and_e2b_network_policy(engine: Engine, daemon, servers: Servers) -> None:  # noqa: ANN001
    r = httpx.post(daemon.url + "/v1/sandboxes", headers=daemon.headers, timeout=60,
                   json={"template": "minimal", "egress": {"deny_out": ["0.0.0.0/0"]}})
    assert r.status_code == 201, r.text
    sid = r.json()["id"]
    try:
        assert reach(engine, sid, TEST_HOST4) is None
        url = f"{daemon.url}/v1/sandboxes/{sid}/egress"
        for bad in ({"deny_out": ["example.com"]}, {"allow_out": "1.2.3.4"}, {"allow_out": ["-bad-.x"]},
                    {"rules": {"a.example": [{"transform": {"headers": {"X": "a\r\nb"}}}]}}, {"nope": 1}):
            r = httpx.put(url, headers=daemon.headers, json=bad, timeout=30)
            assert r.status_code == 400 and r.json()["code"] == "invalid_request", (bad, r.text)
        r = httpx.put(url, headers=daemon.headers, json={"allow_out": [TEST_HOST4], "deny_out": ["0.0.0.0/0"]},
                      timeout=30)
        assert r.status_code == 200 and TEST_HOST4 + "/32" in r.json()["allow_out"], r.text
        assert reach(engine, sid, TEST_HOST4) == HOST_SIDE4
        e2b = {"X-API-KEY": daemon.headers["Authorization"].split()[-1]}
        r = httpx.put(f"{daemon.url}/sandboxes/{sid}/network", headers=e2b, json={"denyOut": [TEST_HOST4]},
                      timeout=30)
        assert r.status_code == 204, r.text
        assert reach(engine, sid, TEST_HOST4) is None and reach(engine, sid, OTHER4) == HOST_SIDE4
        r = httpx.put(f"{daemon.url}/sandboxes/{sid}/network", headers=e2b, timeout=30,
                      json={"egressProxy": {"address": "proxy.example:1080"}})
        assert r.status_code == 501, r.text
        from shoal.client import Sandbox  # the SDK: the same endpoint
        applied = Sandbox.connect(sid, url=daemon.url, api_key=daemon.key).update_network(deny_out=["0.0.0.0/0"],
                                                                                         allow_out=[OTHER4])
        assert applied["allow_out"] == [f"{OTHER4}/32"]
        assert reach(engine, sid, TEST_HOST4) is None and reach(engine, sid, OTHER4) == HOST_SIDE4
        r = httpx.post(f"{daemon.url}/sandboxes", headers=e2b, timeout=60,  # E2B's create: network={...}
                       json={"templateID": "minimal", "network": {"denyOut": ["0.0.0.0/0"], "allowOut": [OTHER4]}})
        assert r.status_code == 201, r.text
        other = r.json()["sandboxID"]
        try:
            assert reach(engine, other, TEST_HOST4) is None and reach(engine, other, OTHER4) == HOST_SIDE4
        finally:
            httpx.delete(f"{daemon.url}/v1/sandboxes/{other}", headers=daemon.headers, timeout=60)
    finally:
        httpx.delete(f"{daemon.url}/v1/sandboxes/{sid}", headers=daemon.headers, timeout=60)


def test_cli_no_internet_and_allow_out(engine: Engine, daemon, servers: Servers) -> None:  # noqa: ANN001
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("SHOAL_API_KEY", "SHOAL_DEBUG")}
    env["SHOAL_URL"] = daemon.url
    shoal = os.path.join(os.path.dirname(os.sys.executable), "shoal")  # the venv's, beside its python
    made = []
    try:
        for args in (["--no-internet"], ["--no-internet", "--allow-out", OTHER4]):
            p = subprocess.run([shoal, "create", *args], env=env, capture_output=True, text=True, timeout=120)
            assert p.returncode == 0, p.stderr
            made.append(p.stdout.strip())
        assert reach(engine, made[0], TEST_HOST4) is None
        assert reach(engine, made[1], TEST_HOST4) is None and reach(engine, made[1], OTHER4) == HOST_SIDE4
        p = subprocess.run([shoal, "create", "--deny-out", "example.com"], env=env, capture_output=True, text=True,
                           timeout=60)
        assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and "deny_out" in p.stderr, p.stderr
        # the same policy changed on the running sandbox: `shoal network policy ID ...`
        p = subprocess.run([shoal, "network", "policy", made[0], "--no-internet", "--allow-out", TEST_HOST4],
                           env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        assert reach(engine, made[0], TEST_HOST4) == HOST_SIDE4 and reach(engine, made[0], OTHER4) is None
        p = subprocess.run([shoal, "network", "policy", made[0], "--deny-out", "not-a-cidr"], env=env,
                           capture_output=True, text=True, timeout=60)
        assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    finally:
        for sid in made:
            subprocess.run([shoal, "rm", sid], env=env, capture_output=True, timeout=60)
