"""Ports (issue 9 item 6) and private networks over REST: ``GET /v1/sandboxes/{id}/ports`` (what listens,
from a hostile agent's answer, checked), exposed ports (a host port on loopback relaying to a sandbox
port: owner's key only, 409 on a taken port, gone on delete, back after a daemon SIGKILL + restart), and
``/v1/networks`` per API key. A daemon of this module's own on loopback; traffic only to loopback.
"""

from __future__ import annotations

import json
import secrets
import signal
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from conftest import RunningDaemon, start_daemon, stop_daemon
from shoal.engine.engine import Engine
from shoal.errors import RuntimeFailure
from shoal.server.exposed_ports import FILE
from shoal.server.listening_ports import MAX_PORTS, validated


class Own:
    """This module's daemon (the restart test replaces it)."""

    d: RunningDaemon


@pytest.fixture(scope="module")
def own() -> Iterator[Own]:
    holder = Own()
    holder.d = start_daemon()
    try:
        yield holder
    finally:
        stop_daemon(holder.d)


def api(own: Own, method: str, path: str, key: str | None = None, **kw: object) -> httpx.Response:
    return httpx.request(method, own.d.url + path, headers={"Authorization": f"Bearer {key or own.d.key}"},
                         timeout=60, **kw)


def create(own: Own, key: str | None = None, **body: object) -> str:
    r = api(own, "POST", "/v1/sandboxes", key, json={"template": "minimal", **body})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def run(own: Own, sid: str, cmd: str) -> dict:
    r = api(own, "POST", f"/v1/sandboxes/{sid}/exec", json={"cmd": cmd, "timeout": 20})
    assert r.status_code == 200, r.text
    return r.json()


def serve(own: Own, sid: str, port: int) -> None:
    run(own, sid, f"(nc -ll -p {port} -e echo hi-{sid} >/dev/null 2>&1 &)")
    deadline = time.monotonic() + 10
    while port not in {p["port"] for p in api(own, "GET", f"/v1/sandboxes/{sid}/ports").json()}:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def read_from(host: str, port: int) -> bytes | None:
    """What a connection to ``host:port`` receives before EOF; None if it is refused."""
    try:
        with socket.create_connection((host, port), timeout=10) as s:
            s.settimeout(10)
            out = b""
            while chunk := s.recv(4096):
                out += chunk
            return out
    except OSError:
        return None


def wait_refused(host: str, port: int) -> None:
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection((host, port), timeout=2).close()
        except ConnectionRefusedError:
            return
        assert time.monotonic() < deadline, f"{host}:{port} still accepts connections"
        time.sleep(0.05)


@pytest.fixture
def other_key(engine: Engine) -> Iterator[str]:
    key, raw = engine.keys.create("ports-other-" + secrets.token_hex(2))
    yield raw
    engine.keys.revoke(key.id)


# --- port ls --------------------------------------------------------------------------------------------
def test_port_ls_lists_listening_tcp_ports(own: Own) -> None:
    sid = create(own)
    try:
        serve(own, sid, 8123)
        ports = api(own, "GET", f"/v1/sandboxes/{sid}/ports").json()
        assert {"port": 8123, "address": "0.0.0.0", "family": 4} in ports or \
            any(p["port"] == 8123 for p in ports), ports
    finally:
        api(own, "DELETE", f"/v1/sandboxes/{sid}")


def test_port_list_from_an_impostor_agent_is_bounded_and_checked() -> None:
    """What sandbox root could answer in the agent's place: garbage is dropped, the list is bounded."""
    hostile = {"ok": True, "ports": [
        {"port": 80, "address": "10.0.0.1", "family": 4},
        {"port": 80, "address": "10.0.0.1", "family": 4},  # duplicate
        {"port": 0, "address": "10.0.0.1", "family": 4}, {"port": 70000, "address": "::", "family": 6},
        {"port": True, "address": "::", "family": 6}, {"port": "22", "address": "::", "family": 6},
        {"port": 22, "address": "::", "family": 4}, {"port": 22, "address": "../etc/passwd", "family": 4},
        {"port": 22, "address": "x" * 10_000, "family": 6}, "junk", None, [1, 2],
        *({"port": p, "address": "::1", "family": 6} for p in range(1, 5000)),
    ]}
    out = validated(hostile)
    assert len(out) == MAX_PORTS
    assert out[0] == {"port": 1, "address": "::1", "family": 6}
    assert {"port": 80, "address": "10.0.0.1", "family": 4} in out
    assert all(isinstance(p["port"], int) and 0 < p["port"] < 65536 for p in out)
    for bad in ({"ok": True, "ports": "all"}, {"ok": True}, ["x"], "x"):
        with pytest.raises(RuntimeFailure):
            validated(bad)


# --- expose ----------------------------------------------------------------------------------------------
def test_expose_relays_loopback_and_conflicts_are_409(own: Own, other_key: str) -> None:
    sid, other = create(own), create(own)
    try:
        serve(own, sid, 8124)
        r = api(own, "POST", f"/v1/sandboxes/{sid}/exposed-ports", json={"port": 8124})
        assert r.status_code == 201, r.text
        e = r.json()
        assert e["bind"] == "127.0.0.1" and e["host_port"] >= 1024
        assert read_from("127.0.0.1", e["host_port"]) == f"hi-{sid}\n".encode()
        # the same host port again, for another sandbox: 409, in the API's error shape
        r = api(own, "POST", f"/v1/sandboxes/{other}/exposed-ports", json={"port": 80, "host_port": e["host_port"]})
        assert r.status_code == 409 and r.json()["code"] == "conflict", r.text
        # a host port something else holds: 409 too
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen(1)
            r = api(own, "POST", f"/v1/sandboxes/{other}/exposed-ports",
                    json={"port": 80, "host_port": held.getsockname()[1]})
            assert r.status_code == 409 and "in use" in r.json()["message"], r.text
        # privileged ports, junk binds, another key: refused, nothing listens
        for body in ({"port": 80, "host_port": 22}, {"port": 80, "bind": "localhost; rm"}, {"port": 0}):
            r = api(own, "POST", f"/v1/sandboxes/{other}/exposed-ports", json=body)
            assert r.status_code in (400, 422) and set(r.json()) >= {"code", "message"}, r.text
        r = api(own, "POST", f"/v1/sandboxes/{sid}/exposed-ports", other_key, json={"port": 8125})
        assert r.status_code == 404, r.text
        assert api(own, "GET", f"/v1/sandboxes/{sid}/exposed-ports").json() == [e]
        # unexpose closes it
        assert api(own, "DELETE", f"/v1/sandboxes/{sid}/exposed-ports/8124").status_code == 204
        wait_refused("127.0.0.1", e["host_port"])
    finally:
        api(own, "DELETE", f"/v1/sandboxes/{sid}")
        api(own, "DELETE", f"/v1/sandboxes/{other}")


def test_delete_closes_exposed_port(own: Own, engine: Engine) -> None:
    sid = create(own)
    serve(own, sid, 8126)
    e = api(own, "POST", f"/v1/sandboxes/{sid}/exposed-ports", json={"port": 8126}).json()
    assert read_from("127.0.0.1", e["host_port"]) == f"hi-{sid}\n".encode()
    assert api(own, "DELETE", f"/v1/sandboxes/{sid}").status_code == 204
    wait_refused("127.0.0.1", e["host_port"])
    saved = json.loads((engine.settings.state_dir / FILE).read_text())
    assert not [x for x in saved if x["sandbox_id"] == sid]


def test_exposed_port_survives_daemon_sigkill_and_goes_with_delete(own: Own, engine: Engine) -> None:
    sid = create(own)
    serve(own, sid, 8127)
    e = api(own, "POST", f"/v1/sandboxes/{sid}/exposed-ports", json={"port": 8127}).json()
    own.d.proc.send_signal(signal.SIGKILL)
    own.d.proc.wait()
    wait_refused("127.0.0.1", e["host_port"])
    own.d = start_daemon()
    assert read_from("127.0.0.1", e["host_port"]) == f"hi-{sid}\n".encode()  # listened again at start
    assert api(own, "GET", f"/v1/sandboxes/{sid}/exposed-ports").json() == [e]
    assert api(own, "DELETE", f"/v1/sandboxes/{sid}").status_code == 204
    wait_refused("127.0.0.1", e["host_port"])
    saved = json.loads((engine.settings.state_dir / FILE).read_text())
    assert not [x for x in saved if x["sandbox_id"] == sid]


# --- private networks over REST ----------------------------------------------------------------------------
def test_networks_per_key_rm_refused_in_use(own: Own, other_key: str) -> None:
    name = "rest-" + secrets.token_hex(3)
    assert api(own, "POST", "/v1/networks", json={"name": name}).status_code == 201
    r = api(own, "POST", "/v1/networks", json={"name": name})
    assert r.status_code == 409 and r.json()["code"] == "conflict"
    r = api(own, "POST", "/v1/networks", json={"name": "Bad Name!"})
    assert r.status_code in (400, 422) and set(r.json()) >= {"code", "message"}
    # another key: does not see it, cannot join it, cannot remove it; its own of the same name is another
    assert name not in {n["name"] for n in api(own, "GET", "/v1/networks", other_key).json()}
    r = api(own, "POST", "/v1/sandboxes", other_key, json={"template": "minimal", "networks": [name]})
    assert r.status_code == 404 and r.json()["code"] == "not_found", r.text
    assert api(own, "DELETE", f"/v1/networks/{name}", other_key).status_code == 404
    sid = create(own, networks=[name], name="web")
    try:
        rec = api(own, "GET", f"/v1/sandboxes/{sid}").json()
        assert rec["networks"] == [name] and rec["name"] == "web"
        listed = {n["name"]: n for n in api(own, "GET", "/v1/networks").json()}
        assert listed[name]["members"] == [sid]
        r = api(own, "DELETE", f"/v1/networks/{name}")
        assert r.status_code == 409 and sid in r.json()["message"], r.text
    finally:
        api(own, "DELETE", f"/v1/sandboxes/{sid}")
    assert api(own, "DELETE", f"/v1/networks/{name}").status_code == 204
    assert name not in {n["name"] for n in api(own, "GET", "/v1/networks").json()}


# --- MCP ------------------------------------------------------------------------------------------------------
def test_mcp_networks_and_ports(own: Own) -> None:
    import anyio
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    name = "mcp-" + secrets.token_hex(3)

    async def main() -> None:
        async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {own.d.key}"},
                                      timeout=httpx2.Timeout(30, read=300)) as http, \
                Client(streamable_http_client(own.d.url + "/mcp", http_client=http)) as client:
            made = await client.call_tool("create_network", {"name": name})
            assert not made.is_error and made.structured_content["name"] == name
            sb = await client.call_tool("create_sandbox", {"template": "minimal", "networks": [name], "name": "db"})
            assert not sb.is_error, sb.content
            sid = sb.structured_content["id"]
            try:
                assert sb.structured_content["networks"] == [name] and sb.structured_content["name"] == "db"
                serve(own, sid, 8130)
                ports = await client.call_tool("list_ports", {"sandbox_id": sid})
                assert 8130 in {p["port"] for p in ports.structured_content["ports"]}
                policy = await client.call_tool("update_network", {"sandbox_id": sid, "allow_out": ["192.0.2.7"],
                                                                   "deny_out": ["0.0.0.0/0"]})
                assert not policy.is_error, policy.content
                assert policy.structured_content["allow_out"] == ["192.0.2.7/32"]
                bad = await client.call_tool("update_network", {"sandbox_id": sid, "deny_out": ["no/such"]})
                assert bad.is_error
                busy = await client.call_tool("delete_network", {"name": name})
                assert busy.is_error and "member" in "".join(getattr(b, "text", "") for b in busy.content)
            finally:
                await client.call_tool("delete_sandbox", {"sandbox_id": sid})
            gone = await client.call_tool("delete_network", {"name": name})
            assert not gone.is_error and name not in {n["name"] for n in gone.structured_content["networks"]}

    anyio.run(main)
