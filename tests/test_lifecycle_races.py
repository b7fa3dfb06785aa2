"""Races and interruptions on one sandbox, through a real ``shoal serve`` (no mocks):

* pause really freezes: a counter stops while paused (measured against a control sandbox's counter,
  not a sleep) and goes on after resume;
* two DELETEs at once: one 204, the other 404, never a 500, nothing left;
* a DELETE while an upload streams in: the upload ends with a clear error, nothing is left;
* an upload whose client disconnects mid-body (REST and E2B envd ``/files``): the old file is intact,
  no temporary file remains, the daemon and the agent hold no more fds than before;
* the daemon SIGKILLed in the middle of a destroy: the next daemon finishes the job;
* a key's memory limit under concurrent creates.

Waits are on conditions (a file appears, a counter moves, a state changes) with generous bounds.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from conftest import RunningDaemon, start_daemon, stop_daemon
from shoal.settings import Settings

SHOAL = "/opt/shoal/venv/bin/shoal"
PREFIX = Settings().resource_prefix
RUN_DIR = Settings().run_dir
CGROUP_ROOT = Path("/sys/fs/cgroup")
TIMEOUT = httpx.Timeout(60.0, connect=10.0)
ENVD = 49983
COUNTER = 'i=0; while true; do i=$((i+1)); echo $i > /root/counter.tmp; mv /root/counter.tmp /root/counter; done'


# --- helpers ---------------------------------------------------------------------------------------

def wait_until(predicate: Callable[[], object], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def host_traces(sid: str) -> list[str]:
    """What of ``sid`` is still on the host (empty: nothing)."""
    bundle = RUN_DIR / "sandboxes" / sid
    found = [str(p) for p in (bundle, RUN_DIR / "crun" / f"{PREFIX}{sid}") if p.exists()]
    found += [str(g) for g in CGROUP_ROOT.glob(f"*/{PREFIX}{sid}")]
    if (CGROUP_ROOT / f"{PREFIX}{sid}").exists():
        found.append(str(CGROUP_ROOT / f"{PREFIX}{sid}"))
    with open("/proc/self/mountinfo") as f:
        found += [line.split()[4] for line in f if line.split()[4].startswith(str(bundle))]
    return found


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def assert_json_error(r: httpx.Response, statuses: tuple[int, ...]) -> None:
    assert r.status_code in statuses, f"{r.status_code}: {r.text[:500]}"
    body = r.json()
    assert set(body) == {"code", "message"} and "Traceback" not in r.text, body


class Client:
    """An API key of its own (``shoal keys create``) and every sandbox it made, deleted at the end."""

    def __init__(self, url: str, **limits: int) -> None:
        self.name = f"test-races-{secrets.token_hex(4)}"
        argv = [SHOAL, "keys", "create", "--name", self.name]
        for k, v in limits.items():
            argv += [f"--{k.replace('_', '-')}", str(v)]
        self.secret = subprocess.run(argv, capture_output=True, text=True, timeout=60,
                                     check=True).stdout.strip().splitlines()[-1]
        self.url = url
        self.headers = {"Authorization": f"Bearer {self.secret}"}
        self.http = httpx.Client(base_url=url, headers=self.headers, timeout=TIMEOUT)
        self.created: list[str] = []

    def create(self, **body: object) -> str:
        body.setdefault("timeout", 3600)  # never expires mid-test
        r = self.http.post("/v1/sandboxes", json=body)
        assert r.status_code == 201, r.text
        self.created.append(r.json()["id"])
        return r.json()["id"]

    def exec(self, sid: str, cmd: object, **body: object) -> dict:
        r = self.http.post(f"/v1/sandboxes/{sid}/exec", json={"cmd": cmd, **body})
        assert r.status_code == 200, r.text
        return r.json()

    def close(self) -> None:
        from shoal.engine import Engine
        from shoal.errors import NotFound
        for sid in self.created:  # paused ones too: a paused sandbox never expires on its own
            try:
                if self.http.delete(f"/v1/sandboxes/{sid}").status_code in (204, 404):
                    continue
            except httpx.HTTPError:
                pass
            try:
                Engine().destroy(sid)
            except NotFound:
                pass
        self.http.close()
        subprocess.run([SHOAL, "keys", "revoke", self.name], capture_output=True, timeout=60)


@pytest.fixture
def client(daemon) -> Iterator[Client]:  # noqa: ANN001
    c = Client(daemon.url)
    try:
        yield c
    finally:
        c.close()


def _host_file(sid: str, path: str) -> Path:
    """A file of the sandbox as the host sees it through the sandbox's overlay (read-only use)."""
    return RUN_DIR / "sandboxes" / sid / "rootfs" / path.lstrip("/")


def _read_int(p: Path) -> int | None:
    try:
        return int(p.read_text())
    except (OSError, ValueError):
        return None


# --- pause ---------------------------------------------------------------------------------------

def test_pause_freezes_processes_and_resume_thaws_them(client: Client):
    """Fails if pause only flips a state: the paused counter would advance while the control's does."""
    paused, control = client.create(), client.create()
    for sid in (paused, control):
        client.exec(sid, COUNTER, background=True)
    p_file, c_file = _host_file(paused, "/root/counter"), _host_file(control, "/root/counter")
    assert wait_until(lambda: (_read_int(p_file) or 0) > 5 and (_read_int(c_file) or 0) > 5, 30)

    r = client.http.post(f"/v1/sandboxes/{paused}/pause")
    assert r.status_code == 200 and r.json()["state"] == "paused", r.text
    frozen = _read_int(p_file)
    start = _read_int(c_file) or 0
    # the clock: the control sandbox counts 200 more while the paused one must not count at all
    assert wait_until(lambda: (_read_int(c_file) or 0) > start + 200, 60), "the control counter is stuck"
    assert _read_int(p_file) == frozen, f"a paused sandbox kept counting: {frozen} -> {_read_int(p_file)}"

    r = client.http.post(f"/v1/sandboxes/{paused}/resume")
    assert r.status_code == 200 and r.json()["state"] == "running", r.text
    assert wait_until(lambda: (_read_int(p_file) or 0) > (frozen or 0) + 5, 30), "the counter did not resume"


# --- concurrent deletes ----------------------------------------------------------------------------

def _delete_at_once(client: Client, sid: str, n: int) -> list[httpx.Response]:
    """``n`` DELETEs of ``sid`` released together on warm connections."""
    clients = [httpx.Client(base_url=client.url, headers=client.headers, timeout=TIMEOUT) for _ in range(n)]
    for c in clients:
        assert c.get(f"/v1/sandboxes/{sid}").status_code == 200  # connected, key verified
    barrier = threading.Barrier(n)
    answers: list[httpx.Response] = []

    def delete(c: httpx.Client) -> None:
        barrier.wait(30)
        answers.append(c.delete(f"/v1/sandboxes/{sid}"))

    threads = [threading.Thread(target=delete, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for c in clients:
        c.close()
    assert not any(t.is_alive() for t in threads), "a delete hangs"
    return answers


def test_double_delete_at_once(client: Client):
    """Fails on a 500 (two destroys tripping over each other), a hang, or host resources left behind.
    A DELETE that overlaps another may answer 204 (the sandbox is gone, as asked) or 404."""
    for _ in range(3):
        sid = client.create()
        client.exec(sid, "sleep 1000 & sleep 1001 &")
        answers = _delete_at_once(client, sid, 4)
        codes = sorted(r.status_code for r in answers)
        assert 204 in codes and set(codes) <= {204, 404}, [(r.status_code, r.text) for r in answers]
        for r in answers:
            if r.status_code == 404:
                assert_json_error(r, (404,))
        assert wait_until(lambda s=sid: host_traces(s) == [], 10), host_traces(sid)
        assert client.http.get(f"/v1/sandboxes/{sid}").status_code == 404


# --- uploads: a delete in the middle, a client that goes away --------------------------------------

class SlowBody:
    """A request body that sends ``first`` bytes, then waits for ``release`` before the rest."""

    def __init__(self, first: bytes, rest: bytes) -> None:
        self.first, self.rest = first, rest
        self.release = threading.Event()

    def __iter__(self) -> Iterator[bytes]:
        yield self.first
        self.release.wait(60)
        yield self.rest


def _temp_files(sid: str, directory: str) -> list[str]:
    """The agent's in-progress upload files (``.<name>.shoal-*``) in ``directory`` of the sandbox."""
    try:
        return [n for n in os.listdir(_host_file(sid, directory)) if ".shoal-" in n]
    except FileNotFoundError:
        return []


def test_delete_during_an_upload(client: Client):
    """Fails with a 500 or a hang if the upload does not notice its sandbox went, or with a leak."""
    sid = client.create()
    body = SlowBody(os.urandom(256 * 1024), os.urandom(256 * 1024))
    box: dict = {}

    def upload() -> None:
        try:
            box["r"] = client.http.put(f"/v1/sandboxes/{sid}/files", params={"path": "/root/up.bin"},
                                       content=body, headers={"Content-Length": str(512 * 1024)})
        except httpx.HTTPError as exc:  # the server may close the connection on a body it will not read
            box["error"] = exc

    t = threading.Thread(target=upload)
    t.start()
    try:
        assert wait_until(lambda: _temp_files(sid, "/root"), 30), "the upload never reached the agent"
        r = client.http.delete(f"/v1/sandboxes/{sid}")
        assert r.status_code == 204, r.text
    finally:
        body.release.set()
        t.join(60)
    assert not t.is_alive(), "the upload hangs after its sandbox was deleted"
    if "r" in box:
        assert_json_error(box["r"], (404, 409, 410, 502, 503))
    assert wait_until(lambda: host_traces(sid) == [], 10), host_traces(sid)


def _interrupted_upload(port: int, request_head: str, declared: int, sent: bytes, sid: str, directory: str) -> None:
    """Send a request head declaring ``declared`` body bytes, send ``sent``, wait until the agent is
    writing the file, then reset the connection (the client vanished mid-body)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        s.sendall((request_head + f"Content-Length: {declared}\r\nConnection: close\r\n\r\n").encode() + sent)
        assert wait_until(lambda: _temp_files(sid, directory), 30), "the upload never reached the agent"
    finally:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
        s.close()


def _assert_upload_left_nothing(client: Client, daemon: RunningDaemon, sid: str, agent_pid: int,
                                before: tuple[int, int], original: bytes) -> None:
    assert wait_until(lambda: not _temp_files(sid, "/root"), 15), f"partial upload left: {_temp_files(sid, '/root')}"
    r = client.http.get(f"/v1/sandboxes/{sid}/files", params={"path": "/root/kept.bin"})
    assert r.status_code == 200 and r.content == original, "the old file was replaced by a partial upload"
    assert wait_until(lambda: fd_count(daemon.proc.pid) <= before[0], 15), (
        f"the daemon holds {fd_count(daemon.proc.pid) - before[0]} more fds after the client vanished")
    assert wait_until(lambda: fd_count(agent_pid) <= before[1], 15), (
        f"the agent holds {fd_count(agent_pid) - before[1]} more fds after the client vanished")
    assert client.exec(sid, ["echo", "fine"])["stdout"] == "fine\n"


def _prepare_upload_target(client: Client, engine) -> tuple[str, bytes, int]:  # noqa: ANN001
    sid = client.create()
    original = os.urandom(4096)
    r = client.http.put(f"/v1/sandboxes/{sid}/files", params={"path": "/root/kept.bin"}, content=original)
    assert r.status_code == 200, r.text
    agent_pid = engine.runtime.init_pid(sid)
    assert agent_pid
    return sid, original, agent_pid


def test_client_vanishing_mid_upload_rest(client: Client, daemon: RunningDaemon, engine):  # noqa: ANN001
    """Fails if a partial body replaces the file, leaves its temporary file, or leaks an fd."""
    sid, original, agent_pid = _prepare_upload_target(client, engine)
    port = int(daemon.url.rsplit(":", 1)[1])
    for _ in range(3):
        before = (fd_count(daemon.proc.pid), fd_count(agent_pid))
        head = (f"PUT /v1/sandboxes/{sid}/files?path=/root/kept.bin HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {client.secret}\r\nContent-Type: application/octet-stream\r\n")
        _interrupted_upload(port, head, 4 * 1024 * 1024, os.urandom(512 * 1024), sid, "/root")
        _assert_upload_left_nothing(client, daemon, sid, agent_pid, before, original)


def test_client_vanishing_mid_upload_e2b(client: Client, daemon: RunningDaemon, engine):  # noqa: ANN001
    """The same through E2B's envd ``POST /files`` on the daemon's port."""
    from shoal.server.e2b.security import Tokens

    sid, original, agent_pid = _prepare_upload_target(client, engine)
    token = Tokens(Settings().state_dir).envd(sid)
    port = int(daemon.url.rsplit(":", 1)[1])
    for _ in range(3):
        before = (fd_count(daemon.proc.pid), fd_count(agent_pid))
        head = (f"POST /files?path=/root/kept.bin&username=root HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"E2b-Sandbox-Id: {sid}\r\nE2b-Sandbox-Port: {ENVD}\r\nX-Access-Token: {token}\r\n"
                "Content-Type: application/octet-stream\r\n")
        _interrupted_upload(port, head, 4 * 1024 * 1024, os.urandom(512 * 1024), sid, "/root")
        _assert_upload_left_nothing(client, daemon, sid, agent_pid, before, original)


# --- the daemon dies in the middle of a destroy -----------------------------------------------------

def _record_state(sid: str) -> str | None:
    import sqlite3
    db = sqlite3.connect(f"file:{Settings().db_path}?mode=ro", uri=True, timeout=30)
    try:
        row = db.execute("SELECT state FROM sandboxes WHERE id = ?", (sid,)).fetchone()
        return row[0] if row else None
    finally:
        db.close()


def _proc_state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def test_daemon_sigkill_during_destroy_is_finished_by_the_next_daemon():
    """Fails if a restarted daemon leaves a ``stopping`` record or its host resources in place."""
    d = start_daemon()
    c = Client(d.url)
    try:
        caught = None
        for _ in range(10):  # until the daemon is caught (stopped) with the destroy half-way
            sid = c.create()
            assert _record_state(sid) == "running", "the daemon's record is not visible to other processes"
            c.exec(sid, "for i in 1 2 3 4 5 6 7 8; do sleep 1000 & done; head -c 8000000 /dev/zero > /root/big")
            deleter = threading.Thread(target=lambda s=sid: _quiet(lambda: httpx.delete(
                f"{d.url}/v1/sandboxes/{s}", headers=c.headers, timeout=30)))
            deleter.start()
            wait_until(lambda s=sid: _record_state(s) != "running", 30, 0.001)
            os.kill(d.proc.pid, signal.SIGSTOP)
            assert wait_until(lambda: _proc_state(d.proc.pid) == "T", 10)
            if _record_state(sid) == "stopping":
                caught = sid
                break
            os.kill(d.proc.pid, signal.SIGCONT)  # the destroy was already over: again
            deleter.join(60)
        assert caught, "the daemon was never caught in the middle of a destroy"
        os.kill(d.proc.pid, signal.SIGKILL)
        d.proc.wait(10)
        deleter.join(60)
        assert _record_state(caught) == "stopping"

        d2 = start_daemon()  # its start-up reconcile sees a ``stopping`` record whose destroyer died
        try:
            assert _record_state(caught) is None, "the half-destroyed sandbox's record survived the restart"
            assert host_traces(caught) == [], host_traces(caught)
            r = httpx.get(f"{d2.url}/v1/sandboxes/{caught}", headers=c.headers, timeout=30)
            assert_json_error(r, (404,))
            c.url = d2.url
            c.http = httpx.Client(base_url=d2.url, headers=c.headers, timeout=TIMEOUT)
        finally:
            c.close()
            stop_daemon(d2)
    finally:
        if d.proc.poll() is None:
            os.kill(d.proc.pid, signal.SIGCONT)
        stop_daemon(d)
        c.http.close()


def _quiet(call: Callable[[], object]) -> None:
    try:
        call()
    except httpx.HTTPError:
        pass  # the daemon was killed under the request


# --- quotas -----------------------------------------------------------------------------------------

def _create_at_once(c: Client, n: int, body: dict) -> list[httpx.Response]:
    """``n`` creates released together on warm connections (the ones that succeed join ``c.created``)."""
    clients = [httpx.Client(base_url=c.url, headers=c.headers, timeout=TIMEOUT) for _ in range(n)]
    for h in clients:
        assert h.get("/v1/sandboxes").status_code == 200
    barrier = threading.Barrier(n)
    answers: list[httpx.Response] = []

    def create(h: httpx.Client) -> None:
        barrier.wait(30)
        r = h.post("/v1/sandboxes", json=body)
        answers.append(r)
        if r.status_code == 201:
            c.created.append(r.json()["id"])

    threads = [threading.Thread(target=create, args=(h,)) for h in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for h in clients:
        h.close()
    assert not any(t.is_alive() for t in threads), "a create hangs"
    return answers


def test_memory_limit_holds_under_concurrent_creates(daemon):  # noqa: ANN001
    """Fails if parallel creates each pass the check before any is counted (more than 600 MiB held)."""
    for _ in range(4):
        c = Client(daemon.url, max_memory=600)
        try:
            answers = _create_at_once(c, 8, {"memory_mb": 256, "timeout": 600})
            codes = sorted(r.status_code for r in answers)
            assert set(codes) <= {201, 429}, [(r.status_code, r.text[:200]) for r in answers]
            held = sum(s["memory_mb"] for s in c.http.get("/v1/sandboxes").json())
            assert codes.count(201) == 2 and held == 512, (codes, held)
        finally:
            c.close()
