"""The daemon survives hostile output, a hostile agent and hostile clients (issue 7, items 3, 7, 11).

Every test runs its own ``shoal serve`` (limits come from the environment it inherits) against real
sandboxes. A hostile agent is played by a unix socket server of the test's own where the real agent
cannot misbehave on cue; a stopped agent is the real one, SIGSTOPped from the host (what sandbox root
achieves with ptrace).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from conftest import RunningDaemon, start_daemon, stop_daemon
from shoal.agent import protocol as p
from shoal.errors import AgentUnavailable, RuntimeFailure
from shoal.runtime.agent_aio import AsyncAgentClient
from shoal.runtime.agent_client import AgentClient

MiB = 1024 * 1024


def wait_for(cond: Callable[[], object], timeout: float, what: str) -> object:
    """Poll ``cond`` until it is truthy; fail naming ``what`` (a condition, not a sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.1)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@contextmanager
def own_daemon(monkeypatch: pytest.MonkeyPatch, nofile_soft: int | None = None, **env: str) -> Iterator[RunningDaemon]:
    """A daemon of this test's own, with ``env`` set (and optionally a low soft fd limit, like systemd's 1024)."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if nofile_soft is not None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile_soft, hard))
    try:
        d = start_daemon()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        for name in env:
            monkeypatch.delenv(name)
    try:
        yield d
    finally:
        stop_daemon(d)


def create_sandbox(d: RunningDaemon, template: str = "minimal") -> str:
    r = httpx.post(d.url + "/v1/sandboxes", json={"template": template}, headers=d.headers, timeout=60)
    assert r.status_code in (200, 201), r.text
    return r.json()["id"]


def delete_sandbox(d: RunningDaemon, sid: str) -> None:
    httpx.delete(f"{d.url}/v1/sandboxes/{sid}", headers=d.headers, timeout=60)


# --- item 3: output is bounded per call and in total ---------------------------------------------------

def test_plain_exec_output_is_capped_and_flagged(monkeypatch):
    from shoal.client import Sandbox

    with own_daemon(monkeypatch, SHOAL_EXEC_MAX_OUTPUT=str(MiB)) as d:
        sid = create_sandbox(d)
        try:
            cmd = "head -c 5000000 /dev/zero | tr '\\0' a; echo done >&2"
            # the fast path, and the FastAPI route (stdin_open makes the fast path hand over)
            for extra in ({}, {"stdin_open": True}):
                r = httpx.post(f"{d.url}/v1/sandboxes/{sid}/exec", json={"cmd": cmd, **extra}, headers=d.headers,
                               timeout=60)
                assert r.status_code == 200, r.text
                body = r.json()
                assert body["exit_code"] == 0  # the command ran to its end: the rest was drained, not killed
                assert len(body["stdout"]) == MiB and body["stdout"] == "a" * MiB
                assert body["stdout_truncated"] is True
                assert body["stderr"] == "done\n" and body["stderr_truncated"] is False
            sb = Sandbox.connect(sid, url=d.url, api_key=d.key)
            res = sb.commands.run(cmd)
            assert res.stdout_truncated and not res.stderr_truncated and len(res.stdout) == MiB
            small = sb.commands.run("echo hi")
            assert small.stdout == "hi\n" and not small.stdout_truncated and not small.truncated
        finally:
            delete_sandbox(d, sid)


def test_daemon_memory_stays_bounded_under_big_outputs(monkeypatch):
    """Four execs of 256 MiB each: the daemon keeps at most the budget, and /health keeps answering."""
    with own_daemon(monkeypatch, SHOAL_EXEC_OUTPUT_BUDGET=str(48 * MiB)) as d:
        sid = create_sandbox(d)
        try:
            before = peak_rss_mib(d.proc.pid)
            cmd = "head -c 268435456 /dev/zero | tr '\\0' x"
            results: list[httpx.Response] = []

            def run() -> None:
                results.append(httpx.post(f"{d.url}/v1/sandboxes/{sid}/exec", json={"cmd": cmd}, headers=d.headers,
                                          timeout=300))
            threads = [threading.Thread(target=run) for _ in range(4)]
            for t in threads:
                t.start()
            health_ok = 0
            while any(t.is_alive() for t in threads):
                assert httpx.get(d.url + "/health", timeout=10).status_code == 200
                health_ok += 1
            for t in threads:
                t.join()
            grew = peak_rss_mib(d.proc.pid) - before
            print(f"daemon peak RSS grew by {grew:.0f} MiB; /health answered {health_ok} times meanwhile")
            assert grew < 400, f"daemon peak RSS grew by {grew:.0f} MiB"
            assert health_ok > 0
            assert [r.status_code for r in results] == [200] * 4
            kept = [len(r.json()["stdout"]) for r in results]
            assert all(r.json()["stdout_truncated"] for r in results)
            assert sum(kept) <= 48 * MiB and max(kept) <= 16 * MiB
        finally:
            delete_sandbox(d, sid)


# --- a hostile agent: oversized frames, silence -----------------------------------------------------

@contextmanager
def fake_agent(tmp_path: Path, answer: Callable[[socket.socket], None]) -> Iterator[str]:
    """A unix socket that plays the agent: reads the request frame, then ``answer(conn)``."""
    path = str(tmp_path / "agent.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(16)
    stop = threading.Event()
    conns: list[socket.socket] = []

    def loop() -> None:
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            conns.append(conn)
            try:
                p.FrameReader(conn).read()
                answer(conn)
            except OSError:
                pass
            conn.close()  # after the answer, the "agent" goes away
    th = threading.Thread(target=loop, daemon=True)
    th.start()
    try:
        yield path
    finally:
        stop.set()
        srv.shutdown(socket.SHUT_RDWR)
        srv.close()
        for c in conns:
            c.close()


def test_oversized_frames_from_the_agent_are_refused(tmp_path):
    def huge_msg(conn: socket.socket) -> None:
        conn.sendall(struct.pack("!BI", p.MSG, 0xFFFFFFFF))  # "4 GiB follow": nothing must be allocated

    with fake_agent(tmp_path, huge_msg) as path:
        with pytest.raises(RuntimeFailure, match="frame"):
            AgentClient(path, "fake").call({"op": "ping"}, timeout=5)
        with pytest.raises(RuntimeFailure, match="frame"):
            asyncio.run(AsyncAgentClient(path, "fake").call({"op": "ping"}))


def test_oversized_output_frames_are_refused(tmp_path):
    """The agent sends output in 64 KiB pieces; a 16 MiB output frame is an attack on host memory."""
    def big_output(conn: socket.socket) -> None:
        conn.sendall(p.message({"ok": True, "pid": 7}))
        conn.sendall(struct.pack("!BI", p.STDOUT, 8 * MiB) + b"x" * (8 * MiB))

    with fake_agent(tmp_path, big_output) as path:
        async def run() -> None:
            stream = await AsyncAgentClient(path, "fake").start({"cmd": ["true"]})
            await stream.wait()
        with pytest.raises(RuntimeFailure, match="frame"):
            asyncio.run(run())
        with pytest.raises(RuntimeFailure, match="frame"):
            AgentClient(path, "fake").run(["true"])


def test_a_silent_agent_makes_calls_fail_fast(tmp_path, monkeypatch):
    import shoal.runtime.agent_aio as agent_aio
    import shoal.runtime.agent_client as agent_client

    monkeypatch.setattr(agent_aio, "AGENT_TIMEOUT", 1.0)
    monkeypatch.setattr(agent_client, "AGENT_TIMEOUT", 1.0)
    silent = threading.Event()
    with fake_agent(tmp_path, lambda conn: silent.wait(30)) as path:
        with pytest.raises(AgentUnavailable):
            asyncio.run(AsyncAgentClient(path, "fake").start({"cmd": ["true"]}))
        with pytest.raises(AgentUnavailable):
            AgentClient(path, "fake").start(["true"])
        silent.set()


# --- item 11: fds of abandoned calls and of calls to a stopped agent ---------------------------------

def _raw_exec(d: RunningDaemon, sid: str, cmd: str) -> socket.socket:
    """Send one plain exec request and leave it in flight; the caller drops the socket later."""
    body = json.dumps({"cmd": cmd}).encode()
    s = socket.create_connection(("127.0.0.1", int(d.url.rsplit(":", 1)[1])))
    s.sendall(b"POST /v1/sandboxes/%s/exec HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\n"
              b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
              % (sid.encode(), d.key.encode(), len(body), body))
    return s


def test_execs_whose_client_went_away_release_their_fds(monkeypatch):
    with own_daemon(monkeypatch) as d:
        sid = create_sandbox(d)
        try:
            pid = d.proc.pid
            base = fd_count(pid)
            socks = [_raw_exec(d, sid, "sleep 600") for _ in range(200)]
            # each call in flight holds its client connection and its agent connection
            wait_for(lambda: fd_count(pid) >= base + 360, 60, "200 execs in flight")
            for s in socks:
                s.close()
            wait_for(lambda: fd_count(pid) <= base + 10, 30, "the daemon to release the abandoned calls' fds")
            r = httpx.post(f"{d.url}/v1/sandboxes/{sid}/exec", json={"cmd": "echo ok"}, headers=d.headers, timeout=30)
            assert r.json()["stdout"] == "ok\n"
        finally:
            delete_sandbox(d, sid)


def test_calls_to_a_stopped_agent_fail_fast_and_release_their_fds(monkeypatch, engine):
    with own_daemon(monkeypatch, SHOAL_AGENT_TIMEOUT="2") as d:
        sid = create_sandbox(d)
        agent_pid = engine.runtime.init_pid(sid)
        assert agent_pid
        try:
            pid = d.proc.pid
            base = fd_count(pid)
            os.kill(agent_pid, signal.SIGSTOP)

            async def calls() -> list[httpx.Response]:
                async with httpx.AsyncClient(headers=d.headers, timeout=60,
                                             limits=httpx.Limits(max_connections=200)) as client:
                    return await asyncio.gather(*(client.post(f"{d.url}/v1/sandboxes/{sid}/exec",
                                                              json={"cmd": "true"}) for _ in range(200)))
            answers = asyncio.run(calls())
            assert {r.status_code for r in answers} == {503}, {r.status_code for r in answers}
            assert {r.json()["code"] for r in answers} == {"agent_unavailable"}
            wait_for(lambda: fd_count(pid) <= base + 10, 30, "the daemon to release the calls' fds")
            os.kill(agent_pid, signal.SIGCONT)
            r = httpx.post(f"{d.url}/v1/sandboxes/{sid}/exec", json={"cmd": "echo back"}, headers=d.headers,
                           timeout=30)
            assert r.status_code == 200 and r.json()["stdout"] == "back\n"
        finally:
            try:
                os.kill(agent_pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
            delete_sandbox(d, sid)


# --- item 7: idle and slow connections --------------------------------------------------------------

def test_idle_and_slowloris_connections_do_not_starve_the_daemon(monkeypatch):
    """2,000 idle connections and a few slowloris ones against a daemon started with systemd's soft fd
    limit (1024): /health and the API still answer, slow headers are cut, the fd count stays bounded."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this test's own client side
    idle: list[socket.socket] = []
    slow: list[socket.socket] = []
    try:
        with own_daemon(monkeypatch, nofile_soft=1024, SHOAL_MAX_CONNECTIONS="500", SHOAL_HEADER_TIMEOUT="3") as d:
            port = int(d.url.rsplit(":", 1)[1])
            for _ in range(20):
                s = socket.create_connection(("127.0.0.1", port))
                s.sendall(b"GET /health HTTP/1.1\r\nHo")  # half a header line
                slow.append(s)
            for _ in range(2000):
                s = socket.socket()
                s.setblocking(False)
                try:
                    s.connect(("127.0.0.1", port))
                except BlockingIOError:
                    pass
                idle.append(s)
            r = httpx.get(d.url + "/health", timeout=10)
            assert r.status_code == 200
            r = httpx.get(d.url + "/v1/sandboxes", headers=d.headers, timeout=10)
            assert r.status_code == 200
            assert fd_count(d.proc.pid) < 500 + 200

            def cut(s: socket.socket) -> bool:
                try:
                    s.sendall(b"s")  # keep trickling, like slowloris
                    s.settimeout(0.05)
                    return s.recv(1) == b""
                except (TimeoutError, BlockingIOError):
                    return False
                except OSError:
                    return True
            wait_for(lambda: all(cut(s) for s in slow), 30, "the daemon to cut the slow headers")
            assert httpx.get(d.url + "/health", timeout=10).status_code == 200
    finally:
        for s in idle + slow:
            s.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _http_on(sock: socket.socket, request: bytes, timeout: float = 30) -> bytes:
    """Send one request on ``sock`` and read its whole answer (Content-Length bodies only)."""
    sock.settimeout(timeout)
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before an answer")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed mid-body")
        body += chunk
    return head.split(b"\r\n")[0]


def _closed(sock: socket.socket, wait: float = 0.05) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except TimeoutError:
        return False
    except OSError:
        return True


def test_the_connection_cap_evicts_strangers_first_and_never_a_keyed_request(monkeypatch):
    """At the cap, new connections push out connections that never showed a valid key, not the idle
    keep-alive connection of an authenticated client, and never a request of one in flight: a keyed
    exec on a full daemon still completes, on a connection that is still usable afterwards."""
    cap = 12
    strangers: list[socket.socket] = []
    with own_daemon(monkeypatch, SHOAL_MAX_CONNECTIONS=str(cap)) as d:
        port = int(d.url.rsplit(":", 1)[1])
        key = d.headers["Authorization"]
        sid = create_sandbox(d)
        try:
            exec_body = json.dumps({"cmd": "sleep 2; echo slept"}).encode()
            keyed_idle = socket.create_connection(("127.0.0.1", port))
            assert _http_on(keyed_idle, f"GET /v1/sandboxes HTTP/1.1\r\nHost: x\r\nAuthorization: {key}\r\n\r\n"
                            .encode()) == b"HTTP/1.1 200 OK"
            busy = socket.create_connection(("127.0.0.1", port))
            _http_on(busy, f"GET /v1/sandboxes HTTP/1.1\r\nHost: x\r\nAuthorization: {key}\r\n\r\n".encode())
            answer: list[bytes] = []
            worker = threading.Thread(target=lambda: answer.append(_http_on(busy, (
                f"POST /v1/sandboxes/{sid}/exec HTTP/1.1\r\nHost: x\r\nAuthorization: {key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(exec_body)}\r\n\r\n").encode() + exec_body)))
            worker.start()
            time.sleep(0.3)  # the exec is in flight
            for _ in range(3 * cap):  # three caps' worth of strangers that never send a byte
                strangers.append(socket.create_connection(("127.0.0.1", port)))
                time.sleep(0.005)
            assert httpx.get(d.url + "/health", timeout=10).status_code == 200  # the newest is served
            worker.join(30)
            assert answer == [b"HTTP/1.1 200 OK"], answer
            assert not _closed(keyed_idle), "an authenticated idle connection was evicted before strangers"
            assert _http_on(keyed_idle, f"GET /v1/sandboxes HTTP/1.1\r\nHost: x\r\nAuthorization: {key}\r\n\r\n"
                            .encode()) == b"HTTP/1.1 200 OK"
            cut = sum(_closed(s) for s in strangers)
            assert cut >= 2 * cap, f"only {cut} of {len(strangers)} strangers were evicted under a cap of {cap}"
        finally:
            for s in strangers:
                s.close()
            delete_sandbox(d, sid)


def test_the_header_deadline_cuts_silent_and_trickling_connections_not_keep_alive(monkeypatch):
    """With a 1 s header deadline: a connection that sends nothing and one that never finishes its
    headers are closed within the deadline plus the guard's sweep (¼ of it); a keep-alive connection
    between two requests is not (uvicorn's keep-alive timeout, 5 s, governs that), and a request whose
    headers came in time may take longer than the deadline for its body."""
    with own_daemon(monkeypatch, SHOAL_HEADER_TIMEOUT="1") as d:
        port = int(d.url.rsplit(":", 1)[1])
        silent = socket.create_connection(("127.0.0.1", port))
        trickle = socket.create_connection(("127.0.0.1", port))
        trickle.sendall(b"GET /health HTTP/1.1\r\nHo")
        kept = socket.create_connection(("127.0.0.1", port))
        assert _http_on(kept, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n") == b"HTTP/1.1 200 OK"
        slow_body = socket.create_connection(("127.0.0.1", port))
        slow_body.sendall(f"POST /v1/keys HTTP/1.1\r\nHost: x\r\nAuthorization: {d.headers['Authorization']}\r\n"
                          "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{".encode())
        started = time.monotonic()
        for s in (silent, trickle):
            wait_for(lambda s=s: _closed(s), 10, "the header deadline to cut a connection")
        assert time.monotonic() - started < 1.0 + 0.25 + 1.0  # deadline + sweep + scheduling slack
        assert not _closed(kept) and not _closed(slow_body, 0.5)
        slow_body.sendall(b"}")
        assert _http_on(slow_body, b"").split(b" ")[0] == b"HTTP/1.1"  # answered, whatever the route says
        assert _http_on(kept, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n") == b"HTTP/1.1 200 OK"
        for s in (silent, trickle, kept, slow_body):
            s.close()
