"""The daemon's REST API end to end: a real ``shoal serve`` on loopback, real sandboxes, no mocks.

Auth and API keys (isolation, limits, revocation), sandbox lifecycle (create, get, list, delete,
timeouts, pause/resume), exec (plain, streamed as NDJSON and SSE, background, stdin, timeouts),
processes, files, watches, the PTY and process WebSockets, the event stream, bad input, metrics,
the OpenAPI document, and 50 concurrent clients without errors or leaks.

Sandboxes are created through the API and deleted through it; a module finalizer deletes any a
failed test left behind. Tests that need a clean view of "their" sandboxes use their own API keys
(``shoal keys create``), since other processes may be using the local key on this host.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from shoal.settings import Settings

PREFIX = Settings().resource_prefix  # this run's instance: shoal-<instance>-<sandbox>

SHOAL = "/opt/shoal/venv/bin/shoal"
RUN_DIR = Settings().run_dir
CGROUP_ROOT = Path("/sys/fs/cgroup")
TIMEOUT = httpx.Timeout(60.0, connect=10.0)


# --- helpers ---------------------------------------------------------------------------------------

@dataclass
class Key:
    name: str
    secret: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secret}"}


def create_key(prefix: str = "test-daemon", max_sandboxes: int | None = None, max_memory: int | None = None) -> Key:
    """A fresh API key through the CLI (``shoal keys create``), named uniquely."""
    name = f"{prefix}-{secrets.token_hex(4)}"
    argv = [SHOAL, "keys", "create", "--name", name]
    if max_sandboxes is not None:
        argv += ["--max-sandboxes", str(max_sandboxes)]
    if max_memory is not None:
        argv += ["--max-memory", str(max_memory)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    assert out.startswith("shoal_"), out
    return Key(name, out.splitlines()[-1])


def revoke_key(key: Key) -> None:
    subprocess.run([SHOAL, "keys", "revoke", key.name], capture_output=True, text=True, timeout=60, check=True)


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    """An error answer: the status, a JSON body ``{code, message}`` and no traceback."""
    assert r.status_code == status, f"expected {status}, got {r.status_code}: {r.text[:500]}"
    assert r.headers.get("content-type", "").startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"code", "message"}, body
    assert isinstance(body["code"], str) and body["code"] and isinstance(body["message"], str) and body["message"]
    assert "Traceback" not in r.text
    if code is not None:
        assert body["code"] == code, body
    return body


def host_traces(sandbox_id: str) -> list[str]:
    """What of ``sandbox_id`` is still on the host: bundle, crun state, cgroups, mounts (empty: gone)."""
    found = []
    bundle = RUN_DIR / "sandboxes" / sandbox_id
    if bundle.exists():
        found.append(f"bundle {bundle}")
    if (RUN_DIR / "crun" / f"{PREFIX}{sandbox_id}").exists():
        found.append("crun state")
    for d in list(CGROUP_ROOT.glob(f"*/{PREFIX}{sandbox_id}")) + [CGROUP_ROOT / f"{PREFIX}{sandbox_id}"]:
        if d.exists():
            found.append(f"cgroup {d}")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4]
            if point == str(bundle) or point.startswith(str(bundle) + "/"):
                found.append(f"mount {point}")
    return found


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.05) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            return value
        time.sleep(interval)


class StreamReader:
    """Reads a streamed response (NDJSON lines) in a thread, so a test can wait with a timeout."""

    def __init__(self, client: httpx.Client, method: str, url: str, **kwargs: object) -> None:
        self.events: queue.Queue = queue.Queue()
        self.status: int | None = None
        self.headers: httpx.Headers | None = None
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._response: httpx.Response | None = None
        self._client, self._method, self._url, self._kwargs = client, method, url, kwargs
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "the stream did not answer within 30 s"

    def _run(self) -> None:
        try:
            with self._client.stream(self._method, self._url, **self._kwargs) as r:  # type: ignore[arg-type]
                self._response = r
                self.status, self.headers = r.status_code, r.headers
                self._ready.set()
                if r.status_code != 200:
                    self.events.put({"type": "http_error", "body": r.read().decode()})
                    return
                for line in r.iter_lines():
                    if self._stop.is_set():
                        return
                    if line.strip():
                        self.events.put(json.loads(line))
        except Exception as exc:  # noqa: BLE001 - surfaced to the test through the queue
            self.events.put({"type": "client_error", "error": repr(exc)})
        finally:
            self._ready.set()
            self.events.put({"type": "closed"})

    def next(self, timeout: float = 10.0) -> dict:
        try:
            return self.events.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no stream event within {timeout} s") from None

    def until(self, predicate: Callable[[dict], bool], timeout: float = 10.0) -> list[dict]:
        """Events up to and including the first that satisfies ``predicate``."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            ev = self.next(max(0.01, deadline - time.monotonic()))
            seen.append(ev)
            if predicate(ev):
                return seen
            assert ev["type"] not in ("closed", "client_error"), f"stream ended early: {seen}"

    def drain(self, wait: float) -> list[dict]:
        """Every event that arrives within ``wait`` seconds."""
        out = []
        deadline = time.monotonic() + wait
        while (left := deadline - time.monotonic()) > 0:
            try:
                out.append(self.events.get(timeout=left))
            except queue.Empty:
                break
        return out

    def close(self) -> None:
        """Leave the stream: the server sees the client go (a stream must not outlive its test)."""
        self._stop.set()
        if self._response is not None:
            try:  # wake the reader blocked in recv(): shut the socket down under it
                sock = self._response.extensions["network_stream"].get_extra_info("socket")
                sock.shutdown(socket.SHUT_RDWR)
            except Exception:  # noqa: BLE001 - already closed
                pass
        self._thread.join(5)


class Api:
    """A client with one key and the sandboxes it made (deleted at the end of the module)."""

    def __init__(self, url: str, key: str, registry: list) -> None:
        self.url, self.key = url, key
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=TIMEOUT)
        self._registry = registry
        registry.append(self)
        self.created: list[str] = []

    def create(self, expect: int = 201, **body: object) -> dict:
        r = self.http.post("/v1/sandboxes", json=body)
        assert r.status_code == expect, r.text
        if r.status_code == 201:
            self.created.append(r.json()["id"])
        return r.json()

    def delete(self, sandbox_id: str) -> httpx.Response:
        return self.http.delete(f"/v1/sandboxes/{sandbox_id}")

    def exec(self, sandbox_id: str, cmd: object, expect: int = 200, **body: object) -> dict:
        r = self.http.post(f"/v1/sandboxes/{sandbox_id}/exec", json={"cmd": cmd, **body})
        assert r.status_code == expect, r.text
        return r.json()

    def cleanup(self) -> None:
        for sid in self.created:
            try:
                if self.delete(sid).status_code in (204, 404):
                    continue
            except httpx.HTTPError:
                pass
            from shoal.engine import Engine  # the key was revoked, or the daemon is gone
            from shoal.errors import NotFound
            try:
                Engine().destroy(sid)
            except NotFound:
                pass
        self.http.close()


@pytest.fixture(scope="module")
def _apis(_keys) -> Iterator[list]:  # noqa: ANN001 - after _keys: sandboxes go before their keys are revoked
    registry: list[Api] = []
    yield registry
    for api in registry:
        api.cleanup()


@pytest.fixture(scope="module")
def _keys() -> Iterator[list[Key]]:
    made: list[Key] = []
    yield made
    for key in made:
        try:
            revoke_key(key)
        except subprocess.CalledProcessError:
            pass  # a test revoked it already


@pytest.fixture(scope="module")
def new_key(_keys: list[Key]) -> Callable[..., Key]:
    def make(**limits: int) -> Key:
        key = create_key(**limits)
        _keys.append(key)
        return key
    return make


@pytest.fixture(scope="module")
def api_for(daemon, _apis) -> Callable[[Key | str], Api]:  # noqa: ANN001
    return lambda key: Api(daemon.url, key.secret if isinstance(key, Key) else key, _apis)


@pytest.fixture(scope="module")
def api(daemon, api_for) -> Api:  # noqa: ANN001
    """A client with the daemon's local key (as the CLI uses it)."""
    return api_for(daemon.key)


@pytest.fixture(scope="module")
def sbx(api: Api) -> str:
    """One running ``minimal`` sandbox for the tests that only use it."""
    # an hour: the default 300 s could expire it mid-module
    return api.create(template="minimal", metadata={"suite": "test_daemon"}, timeout=3600)["id"]


# --- auth --------------------------------------------------------------------------------------------

def test_health_needs_no_key(daemon):
    r = httpx.get(daemon.url + "/health", timeout=TIMEOUT)
    assert r.status_code == 200
    assert r.json()["status"] == "ok" and r.json()["version"]


def _all_routes(daemon) -> list[tuple[str, str]]:  # noqa: ANN001
    spec = httpx.get(daemon.url + "/openapi.json", timeout=TIMEOUT).json()
    return [(method.upper(), path) for path, ops in spec["paths"].items() for method in ops if path != "/health"]


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer shoal_" + "0" * 40},
    {"Authorization": "Bearer nonsense"},
    {"Authorization": "Basic dXNlcjpwYXNz"},
    {"X-API-Key": "shoal_" + "f" * 40},
], ids=["no-key", "unknown-key", "malformed-key", "basic-auth", "unknown-x-api-key"])
def test_every_route_but_health_needs_a_valid_key(daemon, sbx, headers):
    routes = _all_routes(daemon)
    assert len(routes) >= 20, routes
    with httpx.Client(base_url=daemon.url, timeout=TIMEOUT) as c:
        for method, path in routes:
            url = path.replace("{sandbox_id}", sbx).replace("{pid}", "1")
            kwargs: dict = {"params": {"path": "/root"}}
            if method == "PUT":
                kwargs["content"] = b"data"
            elif method == "POST":
                kwargs["json"] = {"cmd": ["true"], "timeout": 5, "path": "/root/x", "src": "/a", "dst": "/b"}
            r = c.request(method, url, headers=headers, **kwargs)
            body = assert_error(r, 401, "unauthorized")
            assert "key" in body["message"].lower(), (method, path, body)


def test_websockets_need_a_valid_key(daemon, sbx):
    for route in ("pty", "process"):
        for headers in ({}, {"Authorization": "Bearer shoal_" + "0" * 40}):
            url = daemon.url.replace("http://", "ws://") + f"/v1/sandboxes/{sbx}/{route}"
            with ws_connect(url, additional_headers=headers, open_timeout=10, proxy=None) as ws:
                msg = json.loads(ws.recv(timeout=10))
                assert msg["type"] == "error" and msg["code"] == "unauthorized", msg
                with pytest.raises(ConnectionClosed) as info:
                    ws.recv(timeout=10)
                assert info.value.rcvd is not None and info.value.rcvd.code == 4401


def test_x_api_key_header_works(daemon, api, sbx):
    r = httpx.get(f"{daemon.url}/v1/sandboxes/{sbx}", headers={"X-API-Key": daemon.key}, timeout=TIMEOUT)
    assert r.status_code == 200 and r.json()["id"] == sbx


# --- sandboxes ---------------------------------------------------------------------------------------

def test_create_get_list_delete(api: Api):
    token = secrets.token_hex(6)
    before = time.time()
    a = api.create(metadata={"suite": token, "role": "a"}, env={"GREETING": "hello"}, cpu=0.5, memory_mb=256,
                   disk_mb=64, timeout=120)
    b = api.create(metadata={"suite": token, "role": "b"})
    assert a["id"] != b["id"]
    assert a["template"] == "minimal" and a["state"] == "running"
    assert (a["cpu"], a["memory_mb"], a["disk_mb"]) == (0.5, 256, 64)
    assert (b["cpu"], b["memory_mb"], b["disk_mb"]) == (1.0, 512, 1024)  # the defaults
    assert a["metadata"] == {"suite": token, "role": "a"}
    assert set(a) == {"id", "template", "state", "cpu", "memory_mb", "disk_mb", "created_at", "expires_at",
                      "metadata", "public_traffic", "public_ports", "traffic_access_token", "reason",
                      "address", "address6", "internet", "layer", "pause_mode", "started_at", "boot_id",
                      "disk_used_bytes", "disk_total_bytes", "volumes", "standby_after",
                      } | ({"name", "networks", "snapshot"} & set(a))  # never env or the owning key
    from datetime import datetime
    created = datetime.fromisoformat(a["created_at"].replace("Z", "+00:00")).timestamp()
    expires = datetime.fromisoformat(a["expires_at"].replace("Z", "+00:00")).timestamp()
    assert before - 1 <= created <= time.time() + 1
    assert 119 <= expires - created <= 121
    assert api.exec(a["id"], "echo $GREETING")["stdout"] == "hello\n"  # the sandbox-wide env

    got = api.http.get(f"/v1/sandboxes/{a['id']}")
    usage = ("disk_used_bytes", "disk_total_bytes")  # measured when one sandbox is asked for (statvfs)
    assert got.status_code == 200 and {k: v for k, v in got.json().items() if k not in usage} == {
        k: v for k, v in a.items() if k not in usage}
    assert got.json()["disk_total_bytes"] > 0

    def ids(**params: object) -> set[str]:
        r = api.http.get("/v1/sandboxes", params=params)
        assert r.status_code == 200, r.text
        return {s["id"] for s in r.json()}

    assert ids(metadata=f"suite={token}") == {a["id"], b["id"]}
    assert ids(metadata=[f"suite={token}", "role=a"]) == {a["id"]}
    assert ids(metadata=[f"suite={token}", "role=c"]) == set()
    assert ids(metadata=f"suite={token}", state="running") == {a["id"], b["id"]}
    assert ids(metadata=f"suite={token}", state="paused") == set()
    assert api.http.post(f"/v1/sandboxes/{b['id']}/pause").status_code == 200
    assert ids(metadata=f"suite={token}", state="paused") == {b["id"]}
    assert ids(metadata=f"suite={token}", state="running") == {a["id"]}
    assert ids(metadata=f"suite={token}", state="running,paused") == {a["id"], b["id"]}
    assert ids(metadata=f"suite={token}", state=["running", "paused"]) == {a["id"], b["id"]}
    assert_error(api.http.get("/v1/sandboxes", params={"state": "sleeping"}), 400, "invalid_request")
    assert_error(api.http.get("/v1/sandboxes", params={"metadata": "no-equals-sign"}), 400, "invalid_request")

    for sid in (a["id"], b["id"]):  # a paused sandbox can be deleted too
        r = api.delete(sid)
        assert r.status_code == 204 and r.content == b""
        assert_error(api.http.get(f"/v1/sandboxes/{sid}"), 404, "not_found")
        assert_error(api.delete(sid), 404, "not_found")
        assert host_traces(sid) == []
    assert ids(metadata=f"suite={token}") == set()


def test_unknown_sandbox_ids_are_404(api: Api):
    for sid in ("a" * 12, "nonexistent0", "UPPERCASE", "x" * 100, "1abc"):
        assert_error(api.http.get(f"/v1/sandboxes/{sid}"), 404, "not_found")
        assert_error(api.delete(sid), 404, "not_found")
        assert_error(api.http.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["true"]}), 404, "not_found")
        assert_error(api.http.get(f"/v1/sandboxes/{sid}/files/stat", params={"path": "/"}), 404, "not_found")


# --- exec -------------------------------------------------------------------------------------------

def test_exec_result(api: Api, sbx: str):
    r = api.exec(sbx, "echo out; echo err >&2; exit 3")
    assert (r["exit_code"], r["stdout"], r["stderr"], r["timed_out"], r["signal"]) == (3, "out\n", "err\n", False, None)
    assert r["pid"] > 1
    r = api.exec(sbx, ["printf", "%s|", "a b", "$HOME", "*"])  # argv: no shell
    assert r["stdout"] == "a b|$HOME|*|" and r["exit_code"] == 0
    r = api.exec(sbx, "echo $FOO; pwd", env={"FOO": "bar"}, cwd="/tmp")
    assert r["stdout"] == "bar\n/tmp\n"
    r = api.exec(sbx, "kill -TERM $$")
    assert r["signal"] == 15 and r["exit_code"] == 143
    assert_error(api.http.post(f"/v1/sandboxes/{sbx}/exec", json={"cmd": ["/no/such/binary"]}), 404, "not_found")


def test_exec_stdin(api: Api, sbx: str):
    r = api.exec(sbx, ["cat"], stdin="line one\nline two\n")
    assert r["stdout"] == "line one\nline two\n" and r["exit_code"] == 0
    r = api.exec(sbx, "wc -c", stdin="")
    assert r["stdout"].strip() == "0"


def test_exec_timeout(api: Api, sbx: str):
    started = time.monotonic()
    r = api.exec(sbx, "echo begun; sleep 30", timeout=0.5)
    assert time.monotonic() - started < 5
    assert r["timed_out"] is True and r["signal"] == 9 and r["exit_code"] == 137
    assert r["stdout"] == "begun\n"
    assert api.exec(sbx, "true", timeout=5)["timed_out"] is False


def _decode(events: list[dict], kind: str) -> bytes:
    return b"".join(base64.b64decode(e["data"]) for e in events if e["type"] == kind)


def test_exec_streamed_as_ndjson(api: Api, sbx: str):
    body = {"cmd": r"echo one; printf '\377\000\001' ; echo two >&2; exit 5", "stream": True}
    with api.http.stream("POST", f"/v1/sandboxes/{sbx}/exec", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in r.iter_lines() if line.strip()]
    assert events[0]["type"] == "start" and events[0]["pid"] > 1
    assert events[-1] == {"type": "end", "exit_code": 5, "signal": None, "timed_out": False}
    assert {e["type"] for e in events[1:-1]} <= {"stdout", "stderr"}
    assert _decode(events, "stdout") == b"one\n\xff\x00\x01"  # byte-exact through base64
    assert _decode(events, "stderr") == b"two\n"
    assert all("text" in e for e in events[1:-1])
    # Accept: application/x-ndjson alone asks for the stream too
    with api.http.stream("POST", f"/v1/sandboxes/{sbx}/exec", json={"cmd": ["echo", "x"]},
                         headers={"Accept": "application/x-ndjson"}) as r:
        events = [json.loads(line) for line in r.iter_lines() if line.strip()]
    assert [e["type"] for e in events] == ["start", "stdout", "end"]


def test_exec_streamed_as_sse(api: Api, sbx: str):
    with api.http.stream("POST", f"/v1/sandboxes/{sbx}/exec", json={"cmd": "echo hi; echo oops >&2"},
                         headers={"Accept": "text/event-stream"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = []
    for block in raw.split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        data = json.loads(fields["data"])
        assert fields["event"] == data["type"]
        events.append(data)
    assert events[0]["type"] == "start" and events[-1]["type"] == "end" and events[-1]["exit_code"] == 0
    assert _decode(events, "stdout") == b"hi\n" and _decode(events, "stderr") == b"oops\n"


def test_streamed_exec_client_leaving_does_not_wedge_anything(api: Api, sbx: str):
    """A streamed exec whose client goes away leaves the daemon and the sandbox usable (the process
    itself keeps running, as documented: it can be found and killed through /processes)."""
    with api.http.stream("POST", f"/v1/sandboxes/{sbx}/exec", json={"cmd": ["yes"], "stream": True}) as r:
        for _ in r.iter_lines():
            break
    assert api.exec(sbx, "echo still-fine")["stdout"] == "still-fine\n"
    for pid, proc in _processes(api, sbx).items():
        if proc["cmd"] == "yes":
            assert api.http.delete(f"/v1/sandboxes/{sbx}/processes/{pid}").status_code in (204, 404)
    assert wait_for(lambda: not [p for p in _processes(api, sbx).values() if p["cmd"] == "yes"], 5)


# --- background processes ----------------------------------------------------------------------------

def _processes(api: Api, sid: str) -> dict[int, dict]:
    r = api.http.get(f"/v1/sandboxes/{sid}/processes")
    assert r.status_code == 200, r.text
    return {p["pid"]: p for p in r.json()}


def test_background_process_list_follow_signal_kill(api: Api, sbx: str):
    loop = 'i=0; while true; do echo "tick $i"; i=$((i+1)); sleep 0.1; done'
    r = api.http.post(f"/v1/sandboxes/{sbx}/exec", json={"cmd": loop, "background": True, "tag": "ticker"})
    assert r.status_code == 200 and set(r.json()) == {"pid"}, r.text
    pid = r.json()["pid"]
    procs = _processes(api, sbx)
    assert pid in procs
    assert procs[pid]["tag"] == "ticker" and procs[pid]["cmd"] == "/bin/sh" and procs[pid]["args"][-1] == loop

    follow = StreamReader(api.http, "GET", f"/v1/sandboxes/{sbx}/processes/{pid}/stream")
    assert follow.status == 200 and follow.headers["content-type"].startswith("application/x-ndjson")
    assert follow.next() == {"type": "start", "pid": pid}
    ticks = follow.until(lambda e: e["type"] == "stdout" and b"tick" in base64.b64decode(e["data"]))
    assert ticks
    r = api.http.post(f"/v1/sandboxes/{sbx}/processes/{pid}/signal", json={"signal": 15})
    assert r.status_code == 204
    end = follow.until(lambda e: e["type"] == "end")[-1]
    assert end["signal"] == 15 and end["exit_code"] == 143
    assert wait_for(lambda: pid not in _processes(api, sbx), 5)
    follow.close()

    pid2 = api.exec(sbx, "sleep 1000", background=True)["pid"]
    assert pid2 in _processes(api, sbx)
    follow = StreamReader(api.http, "GET", f"/v1/sandboxes/{sbx}/processes/{pid2}/stream")
    assert follow.next()["type"] == "start"
    assert api.http.delete(f"/v1/sandboxes/{sbx}/processes/{pid2}").status_code == 204
    end = follow.until(lambda e: e["type"] == "end")[-1]
    assert end["signal"] == 9
    assert wait_for(lambda: pid2 not in _processes(api, sbx), 5)
    follow.close()

    # the process is gone: every per-pid route says so
    assert_error(api.http.post(f"/v1/sandboxes/{sbx}/processes/{pid2}/signal", json={"signal": 9}), 404, "not_found")
    assert_error(api.http.delete(f"/v1/sandboxes/{sbx}/processes/{pid2}"), 404, "not_found")
    assert_error(api.http.get(f"/v1/sandboxes/{sbx}/processes/{pid2}/stream"), 404, "not_found")
    assert_error(api.http.post(f"/v1/sandboxes/{sbx}/processes/{pid2}/stdin", json={"data": "x"}), 404, "not_found")


def test_background_process_gets_its_stdin_from_the_body(api: Api, sbx: str):
    pid = api.exec(sbx, "cat > /tmp/bg-stdin; echo done >> /tmp/bg-stdin", background=True, stdin="from body\n")["pid"]
    assert wait_for(lambda: pid not in _processes(api, sbx), 5)
    assert api.exec(sbx, ["cat", "/tmp/bg-stdin"])["stdout"] == "from body\ndone\n"


def test_stdin_route_feeds_a_background_process_with_stdin_open(api: Api, sbx: str):
    pid = api.exec(sbx, ["cat"], background=True, stdin_open=True)["pid"]
    follow = StreamReader(api.http, "GET", f"/v1/sandboxes/{sbx}/processes/{pid}/stream")
    try:
        assert follow.next() == {"type": "start", "pid": pid}
        r = api.http.post(f"/v1/sandboxes/{sbx}/processes/{pid}/stdin", json={"data": "line 1\n"})
        assert r.status_code == 204, r.text
        got = follow.until(lambda e: e["type"] == "stdout")
        assert base64.b64decode(got[-1]["data"]) == b"line 1\n"
        assert api.http.post(f"/v1/sandboxes/{sbx}/processes/{pid}/stdin/close").status_code == 204
        end = follow.until(lambda e: e["type"] == "end")[-1]
        assert end["exit_code"] == 0
    finally:
        follow.close()
    assert wait_for(lambda: pid not in _processes(api, sbx), 5)


def test_stdin_route_reaches_a_process_started_over_the_websocket(daemon, api: Api, sbx: str):
    """``POST /processes/{pid}/stdin`` and ``/stdin/close`` feed a process whose stdin is open."""
    url = daemon.url.replace("http://", "ws://") + f"/v1/sandboxes/{sbx}/process"
    with ws_connect(url, additional_headers={"Authorization": f"Bearer {api.key}"}, proxy=None) as ws:
        ws.send(json.dumps({"cmd": ["cat"]}))
        start = json.loads(ws.recv(timeout=10))
        assert start["type"] == "start"
        pid = start["pid"]
        r = api.http.post(f"/v1/sandboxes/{sbx}/processes/{pid}/stdin", json={"data": "via rest\n"})
        assert r.status_code == 204, r.text
        raw = base64.b64encode(b"\x00bin\n").decode()
        assert api.http.post(f"/v1/sandboxes/{sbx}/processes/{pid}/stdin", json={"data_b64": raw}).status_code == 204
        assert_error(api.http.post(f"/v1/sandboxes/{sbx}/processes/{pid}/stdin", json={"data_b64": "!!"}), 400)
        assert api.http.post(f"/v1/sandboxes/{sbx}/processes/{pid}/stdin/close").status_code == 204
        out, end = b"", None
        while end is None:
            msg = ws.recv(timeout=10)
            if isinstance(msg, bytes):
                assert msg[0] == 1
                out += msg[1:]
            else:
                end = json.loads(msg)
        assert out == b"via rest\n\x00bin\n"
        assert end["type"] == "end" and end["exit_code"] == 0


def test_stdin_route_refuses_bad_base64_with_400(api: Api, sbx: str):
    """Found by the fuzzer: non-ASCII text in ``data_b64`` must be a 400, not a 500."""
    for bad in ("é", "ÿÿÿÿ", "abc\u20ac", "!!", "abc"):
        r = api.http.post(f"/v1/sandboxes/{sbx}/processes/1/stdin", json={"data_b64": bad})
        assert_error(r, 400, "invalid_request")


# --- files ------------------------------------------------------------------------------------------

def test_files_upload_download_list_stat_mkdir_move_delete(api: Api, sbx: str):
    data = os.urandom(3 * 1024 * 1024 + 12345)
    base = f"/root/files-{secrets.token_hex(3)}"
    assert api.http.post(f"/v1/sandboxes/{sbx}/files/mkdir", json={"path": base + "/sub/deeper"}).status_code == 201

    def chunks() -> Iterator[bytes]:  # a streamed upload (chunked transfer encoding)
        for i in range(0, len(data), 256 * 1024):
            yield data[i:i + 256 * 1024]

    r = api.http.put(f"/v1/sandboxes/{sbx}/files", params={"path": base + "/blob.bin"}, content=chunks(),
                     headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    entry = r.json()
    assert entry["type"] == "file" and entry["size"] == len(data) and entry["path"] == base + "/blob.bin"

    r = api.http.get(f"/v1/sandboxes/{sbx}/files", params={"path": base + "/blob.bin"})
    assert r.status_code == 200 and r.content == data
    assert int(r.headers["content-length"]) == len(data)
    got = bytearray()
    with api.http.stream("GET", f"/v1/sandboxes/{sbx}/files", params={"path": base + "/blob.bin"}) as r:
        for chunk in r.iter_bytes():
            got += chunk
    assert bytes(got) == data
    sha = api.exec(sbx, ["md5sum", base + "/blob.bin"])["stdout"].split()[0]
    import hashlib
    assert sha == hashlib.md5(data).hexdigest()

    r = api.http.put(f"/v1/sandboxes/{sbx}/files", params={"path": base + "/small.txt", "mode": 0o640},
                     content=b"hello\n")
    assert r.status_code == 200 and r.json()["permissions"] == "-rw-r-----"
    r = api.http.put(f"/v1/sandboxes/{sbx}/files", params={"path": base + "/small.txt", "append": "true"},
                     content=b"world\n")
    assert r.status_code == 200 and r.json()["size"] == 12
    assert api.http.get(f"/v1/sandboxes/{sbx}/files", params={"path": base + "/small.txt"}).content == b"hello\nworld\n"
    empty = api.http.put(f"/v1/sandboxes/{sbx}/files", params={"path": base + "/empty"}, content=b"")
    assert empty.status_code == 200 and empty.json()["size"] == 0

    r = api.http.get(f"/v1/sandboxes/{sbx}/files/list", params={"path": base})
    assert r.status_code == 200
    listing = {e["name"]: e for e in r.json()}
    assert set(listing) == {"blob.bin", "small.txt", "empty", "sub"}
    assert listing["sub"]["type"] == "dir" and listing["blob.bin"]["size"] == len(data)
    deep = {e["path"] for e in api.http.get(f"/v1/sandboxes/{sbx}/files/list",
                                            params={"path": base, "depth": 3}).json()}
    assert base + "/sub/deeper" in deep

    r = api.http.get(f"/v1/sandboxes/{sbx}/files/stat", params={"path": base + "/small.txt"})
    assert r.status_code == 200 and r.json()["size"] == 12 and r.json()["type"] == "file"
    assert r.json()["owner"] == "root"

    r = api.http.post(f"/v1/sandboxes/{sbx}/files/move", json={"src": base + "/small.txt", "dst": base + "/sub/moved"})
    assert r.status_code == 200 and r.json()["path"] == base + "/sub/moved"
    assert_error(api.http.get(f"/v1/sandboxes/{sbx}/files/stat", params={"path": base + "/small.txt"}), 404,
                 "not_found")
    assert api.http.get(f"/v1/sandboxes/{sbx}/files", params={"path": base + "/sub/moved"}).content == b"hello\nworld\n"

    assert_error(api.http.post(f"/v1/sandboxes/{sbx}/files/mkdir", json={"path": base + "/sub"}), 409, "conflict")
    r = api.http.delete(f"/v1/sandboxes/{sbx}/files", params={"path": base + "/blob.bin"})
    assert r.status_code == 204
    assert_error(api.http.get(f"/v1/sandboxes/{sbx}/files", params={"path": base + "/blob.bin"}), 404, "not_found")
    assert api.http.delete(f"/v1/sandboxes/{sbx}/files", params={"path": base}).status_code == 204  # recursive
    assert_error(api.http.get(f"/v1/sandboxes/{sbx}/files/list", params={"path": base}), 404, "not_found")


def test_file_errors(api: Api, sbx: str):
    assert_error(api.http.get(f"/v1/sandboxes/{sbx}/files", params={"path": "/no/such/file"}), 404, "not_found")
    assert_error(api.http.get(f"/v1/sandboxes/{sbx}/files/stat", params={"path": "/no/such"}), 404, "not_found")
    assert_error(api.http.delete(f"/v1/sandboxes/{sbx}/files", params={"path": "/no/such"}), 404, "not_found")
    assert_error(api.http.post(f"/v1/sandboxes/{sbx}/files/move", json={"src": "/no/a", "dst": "/tmp/b"}), 404)
    assert_error(api.http.get(f"/v1/sandboxes/{sbx}/files"), 400, "invalid_request")  # path is required
    assert_error(api.http.get(f"/v1/sandboxes/{sbx}/files", params={"path": ""}), 400, "invalid_request")
    r = api.http.put(f"/v1/sandboxes/{sbx}/files", params={"path": "/etc/hostname/below-a-file"}, content=b"x")
    assert_error(r, 409, "conflict")  # a file is in the way (missing parent directories are created)
    assert_error(api.http.get(f"/v1/sandboxes/{sbx}/files", params={"path": "/etc"}), 400, "invalid_request")
    assert_error(api.http.get(f"/v1/sandboxes/{sbx}/files", params={"path": "/dev/zero"}), 400, "invalid_request")
    assert_error(api.http.delete(f"/v1/sandboxes/{sbx}/files", params={"path": "/"}), 400, "invalid_request")


def test_watch_stream_gets_events(api: Api, sbx: str):
    d = f"/root/watched-{secrets.token_hex(3)}"
    assert api.http.post(f"/v1/sandboxes/{sbx}/files/mkdir", json={"path": d}).status_code == 201
    watch = StreamReader(api.http, "GET", f"/v1/sandboxes/{sbx}/files/watch", params={"path": d})
    try:
        assert watch.status == 200 and watch.headers["content-type"].startswith("application/x-ndjson")
        assert watch.next() == {"type": "started", "path": d}
        r = api.http.put(f"/v1/sandboxes/{sbx}/files", params={"path": d + "/new.txt"}, content=b"x")
        assert r.status_code == 200
        seen = watch.until(lambda e: e.get("name") == "new.txt")
        assert seen[-1]["type"] in ("create", "rename", "write"), seen
        assert seen[-1]["path"].endswith("/new.txt") or seen[-1]["path"] == d, seen
    finally:
        watch.close()
    assert_error(api.http.get(f"/v1/sandboxes/{sbx}/files/watch", params={"path": "/no/such/dir"}), 404)


# --- websockets ------------------------------------------------------------------------------------

def _ws_read_until(ws, needle: bytes, timeout: float = 10.0) -> bytes:  # noqa: ANN001
    out = b""
    deadline = time.monotonic() + timeout
    while needle not in out:
        msg = ws.recv(timeout=max(0.01, deadline - time.monotonic()))
        assert isinstance(msg, bytes), f"expected output, got {msg!r} after {out!r}"
        assert msg[0] == 1
        out += msg[1:]
    return out


def test_pty_websocket(daemon, api: Api, sbx: str):
    url = daemon.url.replace("http://", "ws://") + f"/v1/sandboxes/{sbx}/pty"
    with ws_connect(url, additional_headers={"Authorization": f"Bearer {api.key}"}, proxy=None) as ws:
        ws.send(json.dumps({"cmd": ["/bin/sh"], "cols": 80, "rows": 24}))
        start = json.loads(ws.recv(timeout=10))
        assert start["type"] == "start" and start["pid"] > 1
        ws.send(b"echo hi\n")
        assert b"hi" in _ws_read_until(ws, b"hi")
        ws.send(b"echo $((6 * 7))\n")
        _ws_read_until(ws, b"42\r\n")  # the answer, not the echoed command line
        ws.send(b"stty size\n")
        _ws_read_until(ws, b"24 80")
        ws.send(json.dumps({"type": "resize", "cols": 100, "rows": 40}))
        ws.send(b"stty size\n")
        _ws_read_until(ws, b"40 100")
        ws.send(b"tty\n")
        _ws_read_until(ws, b"/dev/pts/")
        ws.send(b"exit 7\n")
        end = None
        deadline = time.monotonic() + 10
        while end is None:
            msg = ws.recv(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(msg, str):
                end = json.loads(msg)
        assert end["type"] == "end" and end["exit_code"] == 7
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=10)


def test_closing_a_terminal_hangs_it_up(daemon, api: Api):
    """A PTY WebSocket that goes away is a terminal hang-up: its shell must not live on forever, and
    a process on the pipes WebSocket gets end-of-input. Otherwise every abandoned ``shoal shell``
    or dropped connection leaves a process behind in the sandbox."""
    sid = api.create()["id"]
    base = daemon.url.replace("http://", "ws://") + f"/v1/sandboxes/{sid}"
    headers = {"Authorization": f"Bearer {api.key}"}
    with ws_connect(base + "/pty", additional_headers=headers, proxy=None) as ws:
        ws.send(json.dumps({"cmd": ["/bin/sh"]}))
        shell = json.loads(ws.recv(timeout=10))["pid"]
        ws.send(b"echo ready\n")
        _ws_read_until(ws, b"ready\r\n")
    with ws_connect(base + "/process", additional_headers=headers, proxy=None) as ws:
        ws.send(json.dumps({"cmd": ["cat"]}))
        cat = json.loads(ws.recv(timeout=10))["pid"]
    left = wait_for(lambda: not ({shell, cat} & set(_processes(api, sid))), 3)
    still = {pid: p["cmd"] for pid, p in _processes(api, sid).items() if pid in (shell, cat)}
    assert left, f"processes still running 3 s after their WebSocket closed: {still}"


def test_stream_ends_cleanly_when_the_sandbox_goes_away(api: Api):
    """A streamed exec whose sandbox is deleted mid-way ends as a complete NDJSON body whose last
    event says what happened; an aborted chunked body is indistinguishable from a network fault."""
    sid = api.create()["id"]
    events: list[dict] = []
    deleter: threading.Thread | None = None
    try:
        body = {"cmd": "echo begun; sleep 30", "stream": True}
        with api.http.stream("POST", f"/v1/sandboxes/{sid}/exec", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.strip():
                    events.append(json.loads(line))
                if deleter is None and b"begun" in _decode(events, "stdout"):  # the process runs: delete now
                    deleter = threading.Thread(target=api.delete, args=(sid,))
                    deleter.start()
        error = None
    except httpx.HTTPError as exc:
        error = exc
    finally:
        if deleter is not None:
            deleter.join(60)
    assert deleter is not None, f"the process never printed before the stream ended: {events}"
    assert events[:1] and events[0]["type"] == "start", events
    assert error is None, f"the stream was cut off ({error!r}) after {events}"
    assert events[-1]["type"] in ("end", "error"), events


def test_pty_websocket_errors(daemon, api: Api, sbx: str):
    base = daemon.url.replace("http://", "ws://")
    headers = {"Authorization": f"Bearer {api.key}"}
    with ws_connect(f"{base}/v1/sandboxes/nosuchsandbox/pty", additional_headers=headers, proxy=None) as ws:
        msg = json.loads(ws.recv(timeout=10))
        assert msg["type"] == "error" and msg["code"] == "not_found"
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=10)
        assert info.value.rcvd.code == 4404
    with ws_connect(f"{base}/v1/sandboxes/{sbx}/pty", additional_headers=headers, proxy=None) as ws:
        ws.send(json.dumps({"cmd": ["/no/such/program"]}))
        msg = json.loads(ws.recv(timeout=10))
        assert msg["type"] == "error" and msg["code"] == "not_found", msg
    with ws_connect(f"{base}/v1/sandboxes/{sbx}/process", additional_headers=headers, proxy=None) as ws:
        ws.send("this is not json")
        msg = json.loads(ws.recv(timeout=10))
        assert msg["type"] == "error" and msg["code"] == "invalid_request", msg


# --- events ----------------------------------------------------------------------------------------

def test_event_stream_shows_own_sandboxes_only(daemon, new_key, api_for):
    a, b = new_key(), new_key()
    api_a, api_b = api_for(a), api_for(b)
    events = StreamReader(api_a.http, "GET", "/v1/events")
    try:
        assert events.status == 200 and events.headers["content-type"].startswith("application/x-ndjson")
        assert events.next() == {"type": "subscribed"}
        mine = api_a.create(metadata={"who": "a"})["id"]
        theirs = api_b.create(metadata={"who": "b"})["id"]
        assert api_a.http.post(f"/v1/sandboxes/{mine}/pause").status_code == 200
        assert api_a.http.post(f"/v1/sandboxes/{mine}/resume").status_code == 200
        assert api_a.http.post(f"/v1/sandboxes/{mine}/timeout", json={"timeout": 100}).status_code == 200
        assert api_b.delete(theirs).status_code == 204
        assert api_a.delete(mine).status_code == 204
        got = events.until(lambda e: e["type"] == "deleted" and e["sandbox"]["id"] == mine)
        got += events.drain(0.5)
    finally:
        events.close()
    kinds = [(e["type"], e["sandbox"]["id"]) for e in got if "sandbox" in e]
    assert kinds == [("created", mine), ("paused", mine), ("resumed", mine), ("timeout", mine), ("deleted", mine)]
    assert all(theirs not in json.dumps(e) for e in got)
    for e in got:
        if "sandbox" in e:
            assert "env" not in e["sandbox"] and "api_key" not in e["sandbox"]
            assert e["sandbox"]["metadata"] == {"who": "a"} and isinstance(e["time"], float)


def test_event_stream_as_sse(daemon, new_key, api_for):
    key = new_key()
    api = api_for(key)
    with api.http.stream("GET", "/v1/events", headers={"Accept": "text/event-stream"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        assert next(lines) == "event: subscribed"


# --- API keys ---------------------------------------------------------------------------------------

def test_keys_cannot_see_each_others_sandboxes(new_key, api_for):
    a, b = api_for(new_key()), api_for(new_key())
    sid = a.create(metadata={"owner": "a"})["id"]
    other = b.create(metadata={"owner": "b"})["id"]
    assert_error(b.http.get(f"/v1/sandboxes/{sid}"), 404, "not_found")
    assert_error(b.http.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["true"]}), 404, "not_found")
    assert_error(b.http.get(f"/v1/sandboxes/{sid}/files", params={"path": "/etc/hostname"}), 404, "not_found")
    assert_error(b.http.put(f"/v1/sandboxes/{sid}/files", params={"path": "/tmp/x"}, content=b"x"), 404, "not_found")
    assert_error(b.http.get(f"/v1/sandboxes/{sid}/processes"), 404, "not_found")
    assert_error(b.http.post(f"/v1/sandboxes/{sid}/pause"), 404, "not_found")
    assert_error(b.http.post(f"/v1/sandboxes/{sid}/timeout", json={"timeout": 5}), 404, "not_found")
    assert_error(b.delete(sid), 404, "not_found")
    b_list = {s["id"] for s in b.http.get("/v1/sandboxes").json()}
    a_list = {s["id"] for s in a.http.get("/v1/sandboxes").json()}
    assert sid not in b_list and other in b_list
    assert other not in a_list and sid in a_list
    assert {s["id"] for s in b.http.get("/v1/sandboxes", params={"metadata": "owner=a"}).json()} == set()
    # and A's sandbox is untouched by B's attempts
    assert a.http.get(f"/v1/sandboxes/{sid}").json()["state"] == "running"
    assert a.exec(sid, "echo mine")["stdout"] == "mine\n"
    assert a.delete(sid).status_code == 204 and b.delete(other).status_code == 204


def test_key_limit_on_sandboxes(new_key, api_for):
    api = api_for(new_key(max_sandboxes=1))
    first = api.create()["id"]
    r = api.http.post("/v1/sandboxes", json={})
    assert_error(r, 429, "quota_exceeded")
    assert r.headers.get("retry-after") == "1"
    assert api.delete(first).status_code == 204
    second = api.create()["id"]  # room again
    assert api.delete(second).status_code == 204


def _create_race(api: Api, n: int) -> list[int]:
    """``n`` creates released together on warm connections; their statuses."""
    clients = [httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {api.key}"}, timeout=TIMEOUT)
               for _ in range(n)]
    for c in clients:
        assert c.get("/v1/sandboxes").status_code == 200  # connected, key verified
    barrier = threading.Barrier(n)
    codes: list[int] = []

    def one(c: httpx.Client) -> None:
        barrier.wait(30)
        r = c.post("/v1/sandboxes", json={})
        codes.append(r.status_code)
        if r.status_code == 201:
            api.created.append(r.json()["id"])

    threads = [threading.Thread(target=one, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for c in clients:
        c.close()
    return codes


def test_key_limit_on_sandboxes_holds_under_concurrent_creates(new_key, api_for):
    """The sandbox limit is a limit, not a hint: N simultaneous creates with a 1-sandbox key → one wins.

    The race is timing-dependent, so this tries several rounds (fresh key each) of 16 creates
    released together; every round must end with exactly one sandbox (stops at the first that does not).
    """
    rounds = []
    for _ in range(8):
        api = api_for(new_key(max_sandboxes=1))
        codes = _create_race(api, 16)
        owned = api.http.get("/v1/sandboxes").json()
        rounds.append((sorted(codes).count(201), len(owned)))
        for sb in owned:
            api.delete(sb["id"])
        assert set(codes) <= {201, 429}, codes
        if rounds[-1] != (1, 1):
            break
    assert all(r == (1, 1) for r in rounds), (
        f"(creates that succeeded, sandboxes the key then held) per round, limit 1: {rounds}")


def test_key_limit_on_memory(new_key, api_for):
    api = api_for(new_key(max_memory=600))
    api.create(memory_mb=512)
    body = assert_error(api.http.post("/v1/sandboxes", json={"memory_mb": 512}), 429, "quota_exceeded")
    assert "600" in body["message"]
    api.create(memory_mb=64)  # 576 MiB still fits
    assert_error(api.http.post("/v1/sandboxes", json={"memory_mb": 32}), 429, "quota_exceeded")


def test_revoked_key_is_refused_within_a_second(daemon, new_key, api_for):
    key = new_key()
    api = api_for(key)
    sid = api.create()["id"]
    try:
        assert api.http.get("/v1/sandboxes").status_code == 200
        revoke_key(key)
        revoked_at = time.monotonic()
        while api.http.get("/v1/sandboxes").status_code != 401:
            assert time.monotonic() - revoked_at < 1.5, "a revoked key still worked after 1.5 s"
            time.sleep(0.05)
        assert_error(api.http.get(f"/v1/sandboxes/{sid}"), 401, "unauthorized")
        assert_error(api.http.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["true"]}), 401, "unauthorized")
        assert_error(api.http.post("/v1/sandboxes", json={}), 401, "unauthorized")
        # the e2b form of the same secret is refused as well
        e2b = "e2b_" + key.secret[len("shoal_"):]
        assert_error(api.http.get("/v1/sandboxes", headers={"Authorization": f"Bearer {e2b}"}), 401, "unauthorized")
    finally:
        # a revoked key cannot delete its sandbox any more: remove it at the engine level
        from shoal.engine import Engine
        from shoal.errors import NotFound
        try:
            Engine().destroy(sid)
        except NotFound:
            pass


# --- lifecycle ------------------------------------------------------------------------------------

def test_timeout_expiry_deletes_the_sandbox_and_its_host_resources(api: Api):
    sid = api.create(timeout=2)["id"]
    assert host_traces(sid) != []
    gone = wait_for(lambda: api.http.get(f"/v1/sandboxes/{sid}").status_code == 404, 15, 0.1)
    assert gone, "a sandbox with a 2 s timeout still exists after 15 s"
    assert wait_for(lambda: host_traces(sid) == [], 2), host_traces(sid)
    assert not (RUN_DIR / "sandboxes" / sid).exists()


def test_timeout_can_be_extended(api: Api):
    sid = api.create(timeout=2)["id"]
    r = api.http.post(f"/v1/sandboxes/{sid}/timeout", json={"timeout": 60})
    assert r.status_code == 200 and r.json()["id"] == sid
    from datetime import datetime
    expires = datetime.fromisoformat(r.json()["expires_at"].replace("Z", "+00:00")).timestamp()
    assert 58 <= expires - time.time() <= 61
    # the clock: a twin created after it with the original 2 s expires; the extended one must not
    twin = api.create(timeout=2)["id"]
    assert wait_for(lambda: api.http.get(f"/v1/sandboxes/{twin}").status_code == 404, 15, 0.1), "twin never expired"
    assert api.http.get(f"/v1/sandboxes/{sid}").json()["state"] == "running"
    assert api.exec(sid, "echo alive")["stdout"] == "alive\n"
    for bad in ({"timeout": 0}, {"timeout": -5}, {"timeout": 8 * 24 * 3600}, {}, {"timeout": "soon"}):
        assert_error(api.http.post(f"/v1/sandboxes/{sid}/timeout", json=bad), 400, "invalid_request")
    # shortening works too
    assert api.http.post(f"/v1/sandboxes/{sid}/timeout", json={"timeout": 1}).status_code == 200
    assert wait_for(lambda: api.http.get(f"/v1/sandboxes/{sid}").status_code == 404, 5, 0.1)


def test_pause_and_resume(api: Api):
    sid = api.create()["id"]
    try:
        _pause_and_resume(api, sid)
    finally:  # a paused sandbox never expires: a test failing half-way must not leave one behind
        api.delete(sid)
    assert host_traces(sid) == []


def _pause_and_resume(api: Api, sid: str) -> None:
    api.exec(sid, "echo kept > /root/state")
    bg = api.exec(sid, "sleep 1000", background=True)["pid"]
    r = api.http.post(f"/v1/sandboxes/{sid}/pause")
    assert r.status_code == 200 and r.json()["state"] == "paused"
    assert api.http.get(f"/v1/sandboxes/{sid}").json()["state"] == "paused"
    body = assert_error(api.http.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": ["true"]}), 409, "conflict")
    assert "paused" in body["message"]
    assert_error(api.http.get(f"/v1/sandboxes/{sid}/files", params={"path": "/root/state"}), 409, "conflict")
    assert_error(api.http.get(f"/v1/sandboxes/{sid}/processes"), 409, "conflict")
    assert_error(api.http.post(f"/v1/sandboxes/{sid}/pause"), 409, "conflict")
    r = api.http.post(f"/v1/sandboxes/{sid}/resume")
    assert r.status_code == 200 and r.json()["state"] == "running"
    assert_error(api.http.post(f"/v1/sandboxes/{sid}/resume"), 409, "conflict")
    assert api.exec(sid, ["cat", "/root/state"])["stdout"] == "kept\n"
    assert bg in _processes(api, sid)
    assert api.delete(sid).status_code == 204


# --- bad input ------------------------------------------------------------------------------------

def test_bad_create_requests(api: Api):
    r = api.http.post("/v1/sandboxes", content=b'{"template": ', headers={"Content-Type": "application/json"})
    body = assert_error(r, 400, "invalid_request")
    assert "json" in body["message"].lower()
    body = assert_error(api.http.post("/v1/sandboxes", json={"tempalte": "minimal"}), 400, "invalid_request")
    assert "tempalte" in body["message"]
    body = assert_error(api.http.post("/v1/sandboxes", json={"cpu": -1}), 400, "invalid_request")
    assert "cpu" in body["message"]
    for bad in ({"memory_mb": 0}, {"memory_mb": 10 ** 9}, {"disk_mb": -1}, {"timeout": 0}, {"cpu": "lots"},
                {"metadata": {"k": 1}}, {"env": ["A=B"]}, {"template": ""}, [], "minimal", {"env": {"A=B": "c"}}):
        assert_error(api.http.post("/v1/sandboxes", json=bad), 400, "invalid_request")
    body = assert_error(api.http.post("/v1/sandboxes", json={"template": "no-such-template"}), 404, "not_found")
    assert "no-such-template" in body["message"] and "template" in body["message"]
    assert_error(api.http.put("/v1/sandboxes", json={}), 405, "method_not_allowed")
    assert_error(api.http.get("/v1/nothing-here"), 404, "not_found")


def test_bad_exec_requests(api: Api, sbx: str):
    url = f"/v1/sandboxes/{sbx}/exec"
    for empty in ([], [""]):
        body = assert_error(api.http.post(url, json={"cmd": empty}), 400, "invalid_request")
        assert "cmd" in body["message"]
    for bad in ({}, {"cmd": 5}, {"cmd": ["ls", 5]}, {"cmd": ["ls"], "timeout": 0}, {"cmd": ["ls"], "timeout": -1},
                {"cmd": ["ls"], "bogus": True}, {"cmd": ["ls"], "env": {"A": 1}}):
        assert_error(api.http.post(url, json=bad), 400, "invalid_request")
    assert_error(api.http.post(url, content=b"cmd=ls", headers={"Content-Type": "application/json"}), 400)
    assert_error(api.http.post(url, json={"cmd": ["ls"], "user": "nobody-here"}), 404, "not_found")
    assert_error(api.http.post(url, json={"cmd": ["ls"], "env": {"A=B": "c"}}), 400, "invalid_request")
    assert_error(api.http.post(f"/v1/sandboxes/{sbx}/processes/notanumber/signal", json={}), 400)
    assert_error(api.http.post(f"/v1/sandboxes/{sbx}/processes/1/signal", json={"signal": 0}), 400)


def test_empty_string_cmd_is_refused(api: Api, sbx: str):
    """``"cmd": ""`` (and whitespace) is as empty as ``[]``: 400, not a silent ``sh -c ''``."""
    for empty in ("", "   "):
        body = assert_error(api.http.post(f"/v1/sandboxes/{sbx}/exec", json={"cmd": empty}), 400, "invalid_request")
        assert "cmd" in body["message"]


#: Valid JSON whose text cannot reach a process: NUL bytes (no C string holds them) and lone UTF-16
#: surrogates (``\\ud903``: no UTF-8 encoding exists). Each must be refused as a 4xx, never a 500,
#: and must never be stored where it poisons later answers.
UNSENDABLE = [
    ("exec", '{"cmd": ["echo", "a\\u0000b"]}'),
    ("exec", '{"cmd": "echo a\\u0000b"}'),
    ("exec", '{"cmd": ["true"], "cwd": "/tm\\u0000p"}'),
    ("exec", '{"cmd": ["echo", "\\ud903"]}'),
    ("exec", '{"cmd": "echo \\ud903"}'),
    ("exec", '{"cmd": ["true"], "env": {"A": "\\ud903"}}'),
    ("exec", '{"cmd": ["true"], "env": {"\\ud903": "x"}}'),
    ("exec", '{"cmd": ["cat"], "stdin": "\\ud903"}'),
    ("exec", '{"cmd": ["cat"], "stdin": "\\ud903", "stream": true}'),
    ("exec", '{"cmd": ["cat"], "stdin": "\\ud903", "background": true}'),
    ("stdin", '{"data": "\\ud903"}'),
    ("create", '{"metadata": {"a": "\\ud903"}}'),
    ("create", '{"metadata": {"\\ud903": "a"}}'),
    ("create", '{"env": {"A": "\\ud903"}}'),
]


def test_text_that_cannot_reach_the_sandbox_is_a_400(new_key, api_for):
    key = new_key()
    api = api_for(key)
    sid = api.create()["id"]
    urls = {"exec": f"/v1/sandboxes/{sid}/exec", "stdin": f"/v1/sandboxes/{sid}/processes/1/stdin",
            "create": "/v1/sandboxes"}
    bad: list[str] = []
    try:
        for route, raw in UNSENDABLE:
            try:  # a fresh connection each: an unhandled error makes the server drop the connection
                r = httpx.post(api.url + urls[route], content=raw.encode(), timeout=TIMEOUT,
                               headers={**key.headers, "Content-Type": "application/json"})
            except httpx.HTTPError as exc:
                bad.append(f"{route} {raw} -> {exc!r}")
                continue
            if r.status_code == 201:
                api.created.append(r.json()["id"])
            if not 400 <= r.status_code < 500:
                bad.append(f"{route} {raw} -> {r.status_code} {r.text[:160]}")
        listed = httpx.get(api.url + "/v1/sandboxes", headers=key.headers, timeout=TIMEOUT)
        if listed.status_code != 200:
            bad.append(f"afterwards GET /v1/sandboxes -> {listed.status_code} {listed.text[:160]}")
        for sb in listed.json() if listed.status_code == 200 else []:
            r = httpx.post(f"{api.url}/v1/sandboxes/{sb['id']}/exec", json={"cmd": ["true"]}, headers=key.headers,
                           timeout=TIMEOUT)
            if r.status_code != 200:
                bad.append(f"afterwards exec in {sb['id']} -> {r.status_code} {r.text[:160]}")
        assert bad == [], "\n".join(bad)
    finally:
        # a create that answered 500 may still have made its sandbox: remove every one of this key
        from shoal.engine import Engine
        from shoal.engine.keys import KeyStore
        from shoal.errors import NotFound
        engine = Engine()
        key_id = {k.name: k.id for k in KeyStore(engine.settings.db_path).list()}[key.name]
        for rec in engine.list():
            if rec.api_key == key_id:
                try:
                    engine.destroy(rec.id)
                except NotFound:
                    pass


# --- metrics and OpenAPI --------------------------------------------------------------------------

def test_metrics(api: Api, sbx: str):
    api.exec(sbx, "true")
    api.exec(sbx, "head -c 20000000 /dev/zero > /tmp/ballast")  # tmpfs pages are charged to the sandbox
    r = api.http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for state in ("creating", "running", "paused", "stopping", "deleted", "error"):
        assert f'shoal_sandboxes{{state="{state}"}}' in text
    running = [line for line in text.splitlines() if line.startswith('shoal_sandboxes{state="running"}')]
    assert float(running[0].split()[-1]) >= 1
    assert "shoal_exec_seconds_bucket" in text and "shoal_create_seconds_bucket" in text
    count = [line for line in text.splitlines() if line.startswith("shoal_exec_seconds_count")]
    assert count and float(count[0].split()[-1]) >= 2
    mem = [line for line in text.splitlines() if line.startswith(f'shoal_sandbox_memory_bytes{{sandbox="{sbx}"}}')]
    assert mem and float(mem[0].split()[-1]) > 20_000_000, mem
    assert f'shoal_sandbox_cpu_seconds{{sandbox="{sbx}"}}' in text
    api.exec(sbx, "rm /tmp/ballast")


def test_openapi_document(daemon):
    r = httpx.get(daemon.url + "/openapi.json", timeout=TIMEOUT)
    assert r.status_code == 200
    spec = r.json()
    assert spec["openapi"].startswith("3.") and spec["info"]["title"] == "Shoal"
    paths = spec["paths"]
    for path in ("/v1/sandboxes", "/v1/sandboxes/{sandbox_id}", "/v1/sandboxes/{sandbox_id}/exec",
                 "/v1/sandboxes/{sandbox_id}/processes", "/v1/sandboxes/{sandbox_id}/files",
                 "/v1/sandboxes/{sandbox_id}/files/list", "/v1/sandboxes/{sandbox_id}/pause", "/v1/events",
                 "/health", "/metrics"):
        assert path in paths, path
    assert set(paths["/v1/sandboxes"]) == {"get", "post"}
    assert "SandboxCreate" in spec["components"]["schemas"]


# --- many clients at once -------------------------------------------------------------------------

def test_fifty_concurrent_clients(daemon, new_key, api_for):
    key = new_key()
    n = 50
    errors: list[str] = []
    statuses: list[int] = []
    ids: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(n)

    def client(i: int) -> None:
        token = f"tok-{i}-{secrets.token_hex(4)}"
        with httpx.Client(base_url=daemon.url, headers=key.headers, timeout=TIMEOUT) as c:
            def call(method: str, url: str, **kw: object) -> httpx.Response:
                r = c.request(method, url, **kw)  # type: ignore[arg-type]
                with lock:
                    statuses.append(r.status_code)
                return r
            try:
                barrier.wait(30)
                r = call("POST", "/v1/sandboxes", json={"metadata": {"client": token}})
                if r.status_code != 201:
                    errors.append(f"{i}: create {r.status_code} {r.text[:200]}")
                    return
                sid = r.json()["id"]
                with lock:
                    ids.append(sid)
                for j in range(3):
                    r = call("POST", f"/v1/sandboxes/{sid}/exec", json={"cmd": ["echo", f"{token}-{j}"]})
                    if r.status_code != 200 or r.json()["stdout"] != f"{token}-{j}\n" or r.json()["exit_code"]:
                        errors.append(f"{i}: exec {j} {r.status_code} {r.text[:200]}")
                r = call("DELETE", f"/v1/sandboxes/{sid}")
                if r.status_code != 204:
                    errors.append(f"{i}: delete {r.status_code} {r.text[:200]}")
            except Exception as exc:  # noqa: BLE001 - collected, asserted below
                errors.append(f"{i}: {exc!r}")

    threads = [threading.Thread(target=client, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    try:
        assert not any(t.is_alive() for t in threads), "clients still running after 120 s"
        assert errors == [], errors[:10]
        assert not [s for s in statuses if s >= 500]
        assert len(ids) == n and len(set(ids)) == n
        assert len(statuses) == n * 5
        leaks = {sid: host_traces(sid) for sid in ids}
        assert {sid: t for sid, t in leaks.items() if t} == {}
        with open("/proc/self/mountinfo") as f:
            mounts = f.read()
        assert not [sid for sid in ids if sid in mounts]
        remaining = httpx.get(daemon.url + "/v1/sandboxes", headers=key.headers, timeout=TIMEOUT).json()
        assert remaining == []
    finally:
        for sid in ids:  # whatever happened, nothing of this test outlives it
            httpx.delete(f"{daemon.url}/v1/sandboxes/{sid}", headers=key.headers, timeout=TIMEOUT)
