"""Tenants never read each other: ``/metrics`` is per key, sandbox ports are private to their owner.

Real daemon on loopback (the session ``daemon`` fixture, whose ``local.key`` is admin), real keys
made in its key store, real sandboxes serving HTTP on a port. Two tenant keys, A and B:

* ``/metrics`` for B never names A's sandboxes (and the other way round); an admin key sees both;
* a port of A's sandbox opens to A's key and to the sandbox's traffic token only; no credentials,
  B's key, a wrong token or B's traffic token are refused with 401/403 ``{code, message}`` and none
  of the service's data; credentials never reach the service;
* a port the owner made public (at create, or later with ``PUT /network``) opens without
  credentials, and still not to another tenant's key.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from shoal.engine.keys import KeyStore
from shoal.settings import Settings

SHOAL = "/opt/shoal/venv/bin/shoal"
TIMEOUT = httpx.Timeout(60.0, connect=10.0)
SECRET = "tenant-a-private-data-" + secrets.token_hex(8)

#: A tiny HTTP service: answers every GET with its secret and the request headers it received.
ECHO_SERVER = r'''
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"secret": sys.argv[2], "headers": {k.lower(): v for k, v in self.headers.items()}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''


class Tenant:
    """One API key and the sandboxes it made through the native REST API."""

    def __init__(self, url: str, name: str, admin: bool = False) -> None:
        self.store = KeyStore(Settings().db_path)
        extra = {"admin": True} if admin else {}
        self.record, self.key = self.store.create(name=f"{name}-{secrets.token_hex(3)}", **extra)
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {self.key}"}, timeout=TIMEOUT)
        self.created: list[str] = []

    def create(self, **body: object) -> dict:
        r = self.http.post("/v1/sandboxes", json={"template": "base", **body})
        assert r.status_code == 201, r.text
        self.created.append(r.json()["id"])
        return r.json()

    def serve(self, sandbox_id: str, port: int) -> None:
        r = self.http.post(f"/v1/sandboxes/{sandbox_id}/exec",
                           json={"cmd": ["python3", "-c", ECHO_SERVER, str(port), SECRET], "background": True})
        assert r.status_code == 200, r.text

    def metrics(self) -> str:
        r = self.http.get("/metrics")
        assert r.status_code == 200, r.text
        return r.text

    def close(self) -> None:
        for sid in self.created:
            self.http.delete(f"/v1/sandboxes/{sid}")
        self.http.close()
        self.store.revoke(self.record.id)


@pytest.fixture(scope="module")
def tenants(daemon) -> Iterator[Callable[..., Tenant]]:  # noqa: ANN001
    made: list[Tenant] = []

    def make(name: str, admin: bool = False) -> Tenant:
        made.append(Tenant(daemon.url, name, admin))
        return made[-1]

    yield make
    for t in made:
        t.close()


@pytest.fixture(scope="module")
def a_and_b(tenants) -> tuple[Tenant, Tenant, dict, dict]:  # noqa: ANN001
    """A's sandbox and B's, both made with the defaults, both serving their echo service on 8000."""
    a, b = tenants("tenant-a"), tenants("tenant-b")
    sa, sb = a.create(), b.create()
    for owner, sbx in ((a, sa), (b, sb)):
        _serving(owner, sbx["id"], 8000)
    return a, b, sa, sb


def _serving(owner: Tenant, sid: str, port: int) -> None:
    owner.serve(sid, port)
    _until(lambda: _get(owner.http.base_url, sid, port, {"Authorization": f"Bearer {owner.key}"}).status_code == 200)


def _until(predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def _get(url: object, sid: str, port: int, headers: dict[str, str] | None = None) -> httpx.Response:
    """A request to ``<port>-<sid>.localhost`` through the daemon's address, as ``get_host`` URLs go."""
    return httpx.get(f"{url}/", headers={"Host": f"{port}-{sid}.localhost", **(headers or {})}, timeout=TIMEOUT)


def _refused(r: httpx.Response, status: int) -> None:
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text[:300]}"
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"code", "message"} and body["message"], body
    assert SECRET not in r.text


def _ids(text: str) -> set[str]:
    return {line.split('sandbox="', 1)[1].split('"', 1)[0] for line in text.splitlines() if 'sandbox="' in line}


# --- metrics ---------------------------------------------------------------------------------------

def test_metrics_show_a_key_only_its_own_sandboxes(daemon, a_and_b, tenants) -> None:  # noqa: ANN001
    a, b, sa, sb = a_and_b
    seen_by_a, seen_by_b = a.metrics(), b.metrics()
    assert sa["id"] in _ids(seen_by_a) and sb["id"] not in seen_by_a
    assert sb["id"] in _ids(seen_by_b) and sa["id"] not in seen_by_b
    running = [line for line in seen_by_b.splitlines() if line.startswith('shoal_sandboxes{state="running"}')]
    assert running and float(running[0].split()[-1]) == 1  # B's own count, not the host's
    assert "shoal_exec_seconds" not in seen_by_b  # daemon-wide histograms are the operator's

    admin = httpx.get(f"{daemon.url}/metrics", headers={"Authorization": f"Bearer {daemon.key}"}, timeout=TIMEOUT)
    assert admin.status_code == 200 and {sa["id"], sb["id"]} <= _ids(admin.text)
    assert "shoal_create_seconds_count" in admin.text
    other_admin = tenants("tenant-admin", admin=True)
    assert {sa["id"], sb["id"]} <= _ids(other_admin.metrics())

    r = httpx.get(f"{daemon.url}/metrics", timeout=TIMEOUT)
    assert r.status_code == 401 and r.json()["code"] == "unauthorized"


def test_cli_makes_admin_keys(daemon, a_and_b) -> None:  # noqa: ANN001
    a, _b, sa, sb = a_and_b
    name = f"tenancy-cli-{secrets.token_hex(3)}"
    out = subprocess.run([SHOAL, "keys", "create", "--admin", "--name", name], capture_output=True, text=True,
                         timeout=60, check=True).stdout.strip().splitlines()[-1]
    store = KeyStore(Settings().db_path)
    try:
        listed = json.loads(subprocess.run([SHOAL, "keys", "ls", "--json"], capture_output=True, text=True,
                                           timeout=60, check=True).stdout)
        assert [k["admin"] for k in listed if k["name"] == name] == [True]
        assert [k["admin"] for k in listed if k["id"] == a.record.id] == [False]
        r = httpx.get(f"{daemon.url}/metrics", headers={"X-API-Key": out}, timeout=TIMEOUT)
        assert r.status_code == 200 and {sa["id"], sb["id"]} <= _ids(r.text)
    finally:
        store.revoke(name)


def test_old_key_databases_gain_the_admin_flag_and_the_local_key_is_admin(tmp_path: Path) -> None:
    from shoal.server.daemon import ensure_local_key, local_key_path

    db = tmp_path / "shoal.db"
    old = sqlite3.connect(db)  # the schema before keys had an admin flag
    old.execute("CREATE TABLE api_keys (id TEXT PRIMARY KEY, name TEXT NOT NULL, hash TEXT NOT NULL UNIQUE, "
                "created_at REAL NOT NULL, revoked INTEGER NOT NULL DEFAULT 0, max_sandboxes INTEGER, "
                "max_memory_mb INTEGER)")
    old.commit()
    old.close()
    store = KeyStore(db)
    tenant_key, tenant_secret = store.create(name="tenant")
    assert store.verify(tenant_secret).admin is False
    # a local.key made by a daemon that predates the flag becomes admin at the next start
    local_key, local_secret = store.create(name="local")
    local_key_path(SimpleNamespace(state_dir=tmp_path)).write_text(local_secret + "\n")
    daemon_like = SimpleNamespace(settings=SimpleNamespace(state_dir=tmp_path), keys=store)
    assert ensure_local_key(daemon_like) == local_secret  # type: ignore[arg-type]
    assert {k.name: k.admin for k in KeyStore(db).list()} == {"tenant": False, "local": True}


# --- the port proxy --------------------------------------------------------------------------------

def test_private_port_refuses_anyone_but_its_owner(daemon, a_and_b) -> None:  # noqa: ANN001
    a, b, sa, sb = a_and_b
    sid = sa["id"]
    _refused(_get(daemon.url, sid, 8000), 401)
    _refused(_get(daemon.url, sid, 8000, {"Authorization": f"Bearer {b.key}"}), 403)
    _refused(_get(daemon.url, sid, 8000, {"X-API-Key": b.key}), 403)
    _refused(_get(daemon.url, sid, 8000, {"X-API-Key": b.key.replace("shoal_", "e2b_")}), 403)
    _refused(_get(daemon.url, sid, 8000, {"Authorization": "Bearer shoal_" + "0" * 40}), 401)
    _refused(_get(daemon.url, sid, 8000, {"e2b-traffic-access-token": sb["traffic_access_token"]}), 401)
    _refused(_get(daemon.url, sid, 8000, {"e2b-traffic-access-token": "stt_" + "0" * 48}), 401)
    # the owner's key with another tenant's key beside it: any credential sent must be right
    _refused(_get(daemon.url, sid, 8000, {"Authorization": f"Bearer {a.key}", "X-API-Key": b.key}), 403)
    # routed by E2B's headers instead of Host: the same rules
    e2b = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "8000"}
    _refused(httpx.get(f"{daemon.url}/", headers=e2b, timeout=TIMEOUT), 401)
    _refused(httpx.get(f"{daemon.url}/", headers={**e2b, "X-API-Key": b.key}, timeout=TIMEOUT), 403)
    # a sandbox that does not exist answers a key the same as another tenant's (no probing)
    _refused(_get(daemon.url, "zz0notasandbox", 8000, {"Authorization": f"Bearer {b.key}"}), 403)


def test_owner_key_and_traffic_token_open_a_private_port(daemon, a_and_b) -> None:  # noqa: ANN001
    a, _b, sa, _sb = a_and_b
    sid = sa["id"]
    assert sa["public_traffic"] is False and sa["public_ports"] == []
    token = sa["traffic_access_token"]
    assert token and a.http.get(f"/v1/sandboxes/{sid}").json()["traffic_access_token"] == token
    for creds in ({"Authorization": f"Bearer {a.key}"}, {"X-API-Key": a.key}, {"e2b-traffic-access-token": token}):
        r = _get(daemon.url, sid, 8000, creds)
        assert r.status_code == 200, r.text
        seen = r.json()
        assert seen["secret"] == SECRET
        # the service never sees the credential (sandbox code is not trusted with its owner's key)
        assert a.key not in json.dumps(seen["headers"]) and token not in json.dumps(seen["headers"])
    e2b = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": "8000", "Authorization": f"Bearer {a.key}"}
    assert httpx.get(f"{daemon.url}/", headers=e2b, timeout=TIMEOUT).json()["secret"] == SECRET
    # a service's own Authorization scheme is not a Shoal credential: it passes through untouched
    r = _get(daemon.url, sid, 8000, {"X-API-Key": a.key, "Authorization": "Bearer app-token"})
    assert r.status_code == 200 and r.json()["headers"]["authorization"] == "Bearer app-token"


def test_private_port_refuses_a_websocket_without_credentials(daemon, a_and_b) -> None:  # noqa: ANN001
    import socket

    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect as ws_connect

    _a, b, sa, _sb = a_and_b
    port = int(daemon.url.rsplit(":", 1)[1])
    for extra, status in (({}, 401), ({"Authorization": f"Bearer {b.key}"}, 403)):
        with pytest.raises(InvalidStatus) as info:
            ws_connect(f"ws://8000-{sa['id']}.localhost/", sock=socket.create_connection(("127.0.0.1", port)),
                       additional_headers=extra, open_timeout=30)
        assert info.value.response.status_code == status
        assert SECRET.encode() not in info.value.response.body


def test_public_port_opens_without_credentials_but_not_to_another_key(daemon, a_and_b) -> None:  # noqa: ANN001
    a, b, _sa, _sb = a_and_b
    pub = b.create(public_ports=[8000])
    assert pub["public_ports"] == [8000] and pub["public_traffic"] is False
    _serving(b, pub["id"], 8000)
    r = _get(daemon.url, pub["id"], 8000)
    assert r.status_code == 200 and r.json()["secret"] == SECRET
    _refused(_get(daemon.url, pub["id"], 8001), 401)  # only the port made public
    _refused(_get(daemon.url, pub["id"], 8000, {"Authorization": f"Bearer {a.key}"}), 403)


def test_owner_changes_which_ports_are_public(daemon, a_and_b) -> None:  # noqa: ANN001
    a, b, sa, _sb = a_and_b
    sid = sa["id"]
    r = b.http.put(f"/v1/sandboxes/{sid}/network", json={"public_traffic": True})
    assert r.status_code == 404 and r.json()["code"] == "not_found"  # not B's to change
    _refused(_get(daemon.url, sid, 8000), 401)
    for bad in ({"public_ports": [70000]}, {"public_ports": ["8000"]}, {"public_ports": [True]}, {"open": True}):
        r = a.http.put(f"/v1/sandboxes/{sid}/network", json=bad)
        assert r.status_code == 400 and set(r.json()) == {"code", "message"}, (bad, r.text)
    try:
        r = a.http.put(f"/v1/sandboxes/{sid}/network", json={"public_ports": [8000]})
        assert r.status_code == 200 and r.json()["public_ports"] == [8000]
        assert _get(daemon.url, sid, 8000).json()["secret"] == SECRET
        r = a.http.put(f"/v1/sandboxes/{sid}/network", json={"public_traffic": True})
        assert r.status_code == 200 and r.json()["public_traffic"] is True
        assert _get(daemon.url, sid, 8000).status_code == 200
    finally:
        assert a.http.put(f"/v1/sandboxes/{sid}/network", json={}).status_code == 200
    _refused(_get(daemon.url, sid, 8000), 401)
