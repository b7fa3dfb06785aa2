"""The official E2B SDK (``e2b``, pinned in the ``test`` extra) against a real ``shoal serve``.

Nothing here is mocked: the SDK talks to the daemon fixture (``tests/conftest.py``) through
``E2B_API_URL``/``E2B_SANDBOX_URL``, and every sandbox is a real ``base`` sandbox.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

e2b = pytest.importorskip("e2b")

from e2b import (  # noqa: E402
    AsyncSandbox,
    CommandExitException,
    FileNotFoundException,
    FilesystemEventType,
    FileType,
    PtySize,
    Sandbox,
    SandboxException,
    SandboxNotFoundException,
    SandboxQuery,
    SandboxState,
    TimeoutException,
)

from shoal.engine.keys import KeyStore, e2b_form  # noqa: E402

TEMPLATE = "base"
ENVD = 49983


@pytest.fixture(scope="module")
def e2b_env(daemon, base_template) -> Iterator[dict[str, str]]:  # noqa: ANN001
    """The three variables ``shoal e2b-env`` prints, for the SDK (it reads them at every call)."""
    env = {"E2B_API_KEY": e2b_form(daemon.key), "E2B_API_URL": daemon.url, "E2B_SANDBOX_URL": daemon.url}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        for k in ("E2B_DEBUG", "E2B_DOMAIN", "E2B_ACCESS_TOKEN"):
            mp.delenv(k, raising=False)
        yield env


@pytest.fixture(scope="module")
def sbx(e2b_env) -> Iterator[Sandbox]:  # noqa: ANN001
    # an hour: E2B's default 300 s could expire the module's sandbox mid-module
    sb = Sandbox.create(TEMPLATE, envs={"SANDBOX_WIDE": "yes"}, metadata={"suite": "e2b-sync"}, timeout=3600)
    try:
        yield sb
    finally:
        sb.kill()


@pytest.fixture
def new_sbx(e2b_env) -> Iterator:  # noqa: ANN001
    made: list[Sandbox] = []

    def make(**kwargs: object) -> Sandbox:
        sb = Sandbox.create(TEMPLATE, **kwargs)  # type: ignore[arg-type]
        made.append(sb)
        return sb

    yield make
    failures = []
    for sb in made:  # every one, paused ones included (a paused sandbox never expires on its own)
        try:
            Sandbox.kill(sb.sandbox_id)
        except Exception as exc:  # noqa: BLE001 - the others must still go
            failures.append(exc)
    assert not failures, failures


def _until(pred, timeout: float = 10.0, every: float = 0.05):  # noqa: ANN001, ANN202
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(every)


def _envd(daemon, sid: str, token: str | None, path: str, body: dict | None = None) -> httpx.Response:  # noqa: ANN001
    headers = {"E2b-Sandbox-Id": sid, "E2b-Sandbox-Port": str(ENVD), "Content-Type": "application/json"}
    if token is not None:
        headers["X-Access-Token"] = token
    return httpx.post(daemon.url + path, headers=headers, content=json.dumps(body or {}), timeout=10)


# --- commands --------------------------------------------------------------------------------------

def test_run_env_user_and_home(sbx: Sandbox) -> None:
    r = sbx.commands.run("echo $SANDBOX_WIDE $ONE; whoami; pwd; id -u", envs={"ONE": "1"})
    assert r.exit_code == 0
    assert r.stdout.splitlines() == ["yes 1", "user", "/home/user", "1000"]
    assert sbx.commands.run("whoami", user="root").stdout.strip() == "root"
    assert sbx.commands.run("pwd", cwd="/tmp").stdout.strip() == "/tmp"


def test_run_streams_stdout_and_stderr(sbx: Sandbox) -> None:
    out: list[str] = []
    err: list[str] = []
    r = sbx.commands.run("for i in 1 2 3; do echo out$i; echo err$i >&2; done", on_stdout=out.append,
                         on_stderr=err.append)
    assert "".join(out) == "out1\nout2\nout3\n" == r.stdout
    assert "".join(err) == "err1\nerr2\nerr3\n" == r.stderr


def test_nonzero_exit_raises(sbx: Sandbox) -> None:
    with pytest.raises(CommandExitException) as info:
        sbx.commands.run("echo partial; echo bad >&2; exit 3")
    assert info.value.exit_code == 3
    assert info.value.stdout == "partial\n"
    assert info.value.stderr == "bad\n"


def test_background_list_kill(sbx: Sandbox) -> None:
    h = sbx.commands.run("sleep 60", background=True)
    procs = {p.pid: p for p in sbx.commands.list()}
    assert h.pid in procs
    assert procs[h.pid].cmd == "/bin/bash" and procs[h.pid].args == ["-l", "-c", "sleep 60"]
    assert sbx.commands.kill(h.pid) is True
    with pytest.raises(CommandExitException) as info:
        h.wait()
    assert info.value.exit_code == -1
    assert h.pid not in {p.pid for p in sbx.commands.list()}
    assert sbx.commands.kill(h.pid) is False


def test_stdin(sbx: Sandbox) -> None:
    h = sbx.commands.run("read line; echo got:$line", background=True, stdin=True)
    sbx.commands.send_stdin(h.pid, "hello\n")
    assert h.wait().stdout == "got:hello\n"
    h = sbx.commands.run("cat; echo done", background=True, stdin=True)
    h.send_stdin("a")
    h.send_stdin(b"b\n")
    sbx.commands.close_stdin(h.pid)
    assert h.wait().stdout == "ab\ndone\n"
    h = sbx.commands.run("cat", background=True, stdin=True)
    sbx.commands.stream_input(h.pid, ["x", b"y", "z\n"])
    sbx.commands.close_stdin(h.pid)
    assert h.wait().stdout == "xyz\n"


def test_timeout_kills_the_process(sbx: Sandbox) -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutException):
        sbx.commands.run("echo $$ > /tmp/slow.pid; sleep 30", timeout=1)
    assert time.monotonic() - started < 10
    pid = sbx.files.read("/tmp/slow.pid").strip()
    _until(lambda: sbx.commands.run(f"kill -0 {pid} 2>/dev/null || echo gone").stdout.strip() == "gone")


def test_background_survives_disconnect_and_connect(sbx: Sandbox) -> None:
    h = sbx.commands.run("sleep 1.5; echo late; exit 4", background=True)
    h.disconnect()
    again = sbx.commands.connect(h.pid)
    with pytest.raises(CommandExitException) as info:
        again.wait()
    assert info.value.exit_code == 4
    assert info.value.stdout == "late\n"


def test_unread_background_output_never_stalls_the_process(sbx: Sandbox) -> None:
    """A background handle nobody reads must not block the process (the SDK user rarely reads it)."""
    sbx.commands.run("rm -f /tmp/loud.done")
    h = sbx.commands.run("head -c 60000000 /dev/zero | tr '\\0' a; echo ok > /tmp/loud.done", background=True,
                         timeout=0)
    _until(lambda: sbx.files.exists("/tmp/loud.done"), timeout=40, every=0.5)
    h.disconnect()


def test_large_output_arrives_whole(sbx: Sandbox) -> None:
    r = sbx.commands.run("head -c 40000000 /dev/zero | tr '\\0' b; echo; echo tail >&2")
    assert len(r.stdout) == 40000001 and r.stdout.count("b") == 40000000 and r.stderr == "tail\n"


def test_unknown_user_is_an_error(sbx: Sandbox) -> None:
    with pytest.raises(SandboxException):
        sbx.commands.run("true", user="nobody-here")


# --- pty -------------------------------------------------------------------------------------------

def test_pty_create_send_resize_kill(sbx: Sandbox) -> None:
    h = sbx.pty.create(PtySize(rows=24, cols=80))
    seen = bytearray()
    lock = threading.Lock()

    def collect() -> None:
        def on_pty(data: bytes) -> None:
            with lock:
                seen.extend(data)
        try:
            h.wait(on_pty=on_pty)
        except CommandExitException:
            pass

    t = threading.Thread(target=collect, daemon=True)
    t.start()
    sbx.pty.send_stdin(h.pid, b"stty size; echo mark$((40+2)); tty\n")

    def text() -> str:
        with lock:
            return seen.decode("utf-8", "replace")
    _until(lambda: "24 80" in text() and "mark42" in text())
    assert "/dev/pts/" in _until(text)
    sbx.pty.resize(h.pid, PtySize(rows=30, cols=100))
    sbx.pty.send_stdin(h.pid, b"stty size\n")
    _until(lambda: "30 100" in text())
    assert sbx.pty.kill(h.pid) is True
    t.join(10)
    assert not t.is_alive()


# --- files -----------------------------------------------------------------------------------------

def test_write_read_text_and_bytes(sbx: Sandbox) -> None:
    info = sbx.files.write("notes/hello.txt", "héllo wörld\n")
    assert info.path == "/home/user/notes/hello.txt" and info.name == "hello.txt"
    assert sbx.files.read("notes/hello.txt") == "héllo wörld\n"
    assert sbx.files.read("/home/user/notes/hello.txt") == "héllo wörld\n"
    blob = bytes(range(256)) * 1000
    sbx.files.write("/tmp/blob.bin", blob)
    assert bytes(sbx.files.read("/tmp/blob.bin", format="bytes")) == blob
    sbx.files.write("/tmp/gz.bin", blob, gzip=True)
    assert bytes(sbx.files.read("/tmp/gz.bin", format="bytes", gzip=True)) == blob
    assert b"".join(sbx.files.read("/tmp/blob.bin", format="stream")) == blob
    assert sbx.commands.run("stat -c %U notes/hello.txt").stdout.strip() == "user"
    with pytest.raises(FileNotFoundException):
        sbx.files.read("does/not/exist")


def test_write_files_list_exists_info(sbx: Sandbox) -> None:
    infos = sbx.files.write_files([{"path": "tree/a.txt", "data": "A"}, {"path": "tree/sub/b.txt", "data": b"BB"},
                                   {"path": "/tmp/tree-c.txt", "data": "C"}])
    assert [i.path for i in infos] == ["/home/user/tree/a.txt", "/home/user/tree/sub/b.txt", "/tmp/tree-c.txt"]
    assert sbx.files.read("tree/sub/b.txt") == "BB"
    top = {e.name: e for e in sbx.files.list("tree")}
    assert set(top) == {"a.txt", "sub"}
    assert top["sub"].type == FileType.DIR and top["a.txt"].type == FileType.FILE
    deep = {e.path for e in sbx.files.list("tree", depth=2)}
    assert deep == {"/home/user/tree/a.txt", "/home/user/tree/sub", "/home/user/tree/sub/b.txt"}
    assert sbx.files.exists("tree/a.txt") and not sbx.files.exists("tree/nope.txt")
    info = sbx.files.get_info("tree/sub/b.txt")
    assert (info.type, info.size, info.owner, info.name) == (FileType.FILE, 2, "user", "b.txt")
    assert info.permissions.startswith("-rw")
    sbx.commands.run("ln -sf a.txt tree/link")
    link = sbx.files.get_info("tree/link")
    assert link.type == FileType.SYMLINK and link.symlink_target == "/home/user/tree/a.txt"  # resolved, as E2B


def test_make_dir_rename_remove(sbx: Sandbox) -> None:
    assert sbx.files.make_dir("made/deep/er") is True
    assert sbx.files.make_dir("made/deep/er") is False
    assert sbx.files.get_info("made/deep/er").type == FileType.DIR
    sbx.files.write("made/x.txt", "x")
    moved = sbx.files.rename("made/x.txt", "made/deep/y.txt")
    assert moved.path == "/home/user/made/deep/y.txt"
    assert not sbx.files.exists("made/x.txt") and sbx.files.read("made/deep/y.txt") == "x"
    sbx.files.remove("made")
    assert not sbx.files.exists("made")
    sbx.files.remove("made")  # like envd: removing what is gone is fine


def test_files_as_users(sbx: Sandbox) -> None:
    sbx.files.write("/root/secret.txt", "root only", user="root")
    assert sbx.files.read("/root/secret.txt", user="root") == "root only"
    assert sbx.files.get_info("/root/secret.txt", user="root").owner == "root"
    with pytest.raises(SandboxException):
        sbx.files.read("/root/secret.txt")  # as the default user
    with pytest.raises(SandboxException):
        sbx.files.write("/root/other.txt", "no")
    assert sbx.files.write("rel.txt", "r", user="root").path == "/root/rel.txt"


def test_watch_dir(sbx: Sandbox) -> None:
    sbx.files.make_dir("watched")
    w = sbx.files.watch_dir("watched")
    try:
        sbx.files.write("watched/new.txt", "1")
        sbx.commands.run("mkdir watched/d && rm watched/new.txt")
        events: list = []
        _until(lambda: events.extend(w.get_new_events()) or
               {(e.name, e.type) for e in events} >= {("new.txt", FilesystemEventType.CREATE),
                                                      ("d", FilesystemEventType.CREATE),
                                                      ("new.txt", FilesystemEventType.REMOVE)})
    finally:
        w.stop()
    with pytest.raises(SandboxException):
        w.get_new_events()


def test_watch_dir_recursive_with_entries(sbx: Sandbox) -> None:
    sbx.files.make_dir("rwatch/inner")
    w = sbx.files.watch_dir("rwatch", recursive=True, include_entry=True)
    try:
        sbx.files.write("rwatch/inner/f.txt", "abc")
        events: list = []
        _until(lambda: events.extend(w.get_new_events()) or any(e.name == "inner/f.txt" for e in events))
        entries = [e.entry for e in events if e.name == "inner/f.txt" and e.entry is not None]
        assert entries and entries[-1].path == "/home/user/rwatch/inner/f.txt"
    finally:
        w.stop()


# --- sandbox lifecycle -----------------------------------------------------------------------------

def test_info_list_filters_and_paging(sbx: Sandbox, new_sbx) -> None:  # noqa: ANN001
    info = sbx.get_info()
    assert info.sandbox_id == sbx.sandbox_id and info.template_id == TEMPLATE
    assert info.metadata == {"suite": "e2b-sync"} and info.state == SandboxState.RUNNING
    assert info.end_at > info.started_at
    tag = f"paging-{time.time_ns()}"
    made = [new_sbx(metadata={"tag": tag, "n": str(i)}) for i in range(3)]
    found = Sandbox.list(query=SandboxQuery(metadata={"tag": tag})).next_items()
    assert {s.sandbox_id for s in found} == {s.sandbox_id for s in made}
    assert {s.metadata["n"] for s in found} == {"0", "1", "2"}
    one = Sandbox.list(query=SandboxQuery(metadata={"tag": tag, "n": "1"})).next_items()
    assert [s.sandbox_id for s in one] == [made[1].sandbox_id]
    pager = Sandbox.list(query=SandboxQuery(metadata={"tag": tag}), limit=2)
    pages = []
    while pager.has_next:
        pages.append([s.sandbox_id for s in pager.next_items()])
    assert [len(p) for p in pages] == [2, 1]
    assert sorted(sum(pages, [])) == sorted(s.sandbox_id for s in made)
    made[0].pause()
    paused = Sandbox.list(query=SandboxQuery(metadata={"tag": tag}, state=[SandboxState.PAUSED])).next_items()
    assert [s.sandbox_id for s in paused] == [made[0].sandbox_id]
    running = Sandbox.list(query=SandboxQuery(metadata={"tag": tag}, state=[SandboxState.RUNNING])).next_items()
    assert {s.sandbox_id for s in running} == {made[1].sandbox_id, made[2].sandbox_id}


def test_connect_timeout_pause_resume_kill(new_sbx) -> None:  # noqa: ANN001
    sb = new_sbx(timeout=120)
    sb.commands.run("echo kept > /tmp/state")
    bg = sb.commands.run("sleep 300", background=True)
    first_end = sb.get_info().end_at
    sb.set_timeout(600)
    assert (sb.get_info().end_at - first_end).total_seconds() > 400
    same = Sandbox.connect(sb.sandbox_id)
    assert same.commands.run("cat /tmp/state").stdout == "kept\n"
    assert sb.pause() is True
    assert sb.get_info().state == SandboxState.PAUSED
    assert Sandbox.pause(sb.sandbox_id) is False  # already paused: 409
    assert not sb.is_running()
    with pytest.raises(SandboxException):
        sb.commands.run("true")
    resumed = Sandbox.connect(sb.sandbox_id, timeout=90)
    assert resumed.get_info().state == SandboxState.RUNNING
    assert resumed.is_running()
    assert bg.pid in {p.pid for p in resumed.commands.list()}  # memory kept: the process lives on
    assert resumed.files.read("/tmp/state") == "kept\n"
    assert sb.kill() is True
    assert sb.kill() is False
    assert not sb.is_running()
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sb.sandbox_id)
    with pytest.raises(SandboxException):
        Sandbox.connect(sb.sandbox_id)


def test_timeout_kills_or_auto_pauses(new_sbx) -> None:  # noqa: ANN001
    doomed = new_sbx(timeout=1)
    kept = new_sbx(timeout=3, lifecycle={"on_timeout": "pause"})
    kept.files.write("/tmp/survives", "yes")
    _until(lambda: kept.get_info().state == SandboxState.PAUSED, timeout=15)
    with pytest.raises(SandboxNotFoundException):
        _until(lambda: doomed.get_info() and False, timeout=15)
    back = Sandbox.connect(kept.sandbox_id)
    assert back.files.read("/tmp/survives") == "yes"
    assert (back.get_info().end_at - back.get_info().started_at).total_seconds() > 250


def test_metrics(sbx: Sandbox) -> None:
    m = sbx.get_metrics()
    assert m and m[0].mem_total == 512 * 1024 * 1024 and m[0].mem_used > 0 and m[0].cpu_count >= 1


def test_same_sandbox_through_the_native_api(sbx: Sandbox, daemon, e2b_env) -> None:  # noqa: ANN001
    r = httpx.get(f"{daemon.url}/v1/sandboxes/{sbx.sandbox_id}", headers=daemon.headers)
    assert r.status_code == 200
    assert r.json()["template"] == TEMPLATE and r.json()["metadata"] == {"suite": "e2b-sync"}
    r = httpx.post(f"{daemon.url}/v1/sandboxes", headers=daemon.headers, json={"template": TEMPLATE})
    assert r.status_code == 201
    native = r.json()["id"]
    try:
        sb = Sandbox.connect(native)
        assert sb.commands.run("echo native").stdout == "native\n"
        assert native in {s.sandbox_id for s in Sandbox.list().next_items()}
    finally:
        httpx.delete(f"{daemon.url}/v1/sandboxes/{native}", headers=daemon.headers)


def test_control_plane_errors_are_e2b_shaped(daemon, e2b_env) -> None:  # noqa: ANN001
    key = {"X-API-KEY": e2b_env["E2B_API_KEY"]}
    r = httpx.get(f"{daemon.url}/sandboxes/zzzznotthere", headers=key)
    assert r.status_code == 404 and r.json()["code"] == 404 and r.json()["message"]
    r = httpx.get(f"{daemon.url}/v2/sandboxes")
    assert r.status_code == 401 and r.json()["code"] == 401
    r = httpx.post(f"{daemon.url}/v2/sandboxes", headers=key, json={"templateID": "no-such-template"})
    assert r.status_code == 404 and isinstance(r.json()["code"], int)
    r = httpx.post(f"{daemon.url}/v2/sandboxes", headers=key, json={"templateID": TEMPLATE, "timeout": -5})
    assert r.status_code == 400 and r.json()["code"] == 400
    # the native API keeps its string codes
    r = httpx.get(f"{daemon.url}/v1/sandboxes/zzzznotthere", headers=daemon.headers)
    assert r.status_code == 404 and r.json()["code"] == "not_found"


def _stream(daemon, sb: Sandbox, method: str, msg: dict) -> list[dict]:  # noqa: ANN001
    """A raw Connect server-streaming call: every frame's JSON, the end frame last."""
    import struct

    body = json.dumps(msg).encode()
    r = httpx.post(f"{daemon.url}/{method}", content=struct.pack("!BI", 0, len(body)) + body, timeout=20,
                   headers={"E2b-Sandbox-Id": sb.sandbox_id, "E2b-Sandbox-Port": str(ENVD),
                            "X-Access-Token": sb._envd_access_token, "Content-Type": "application/connect+json"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/connect+json"
    frames, data = [], r.content
    while data:
        flags, n = struct.unpack("!BI", data[:5])
        frames.append({"end": bool(flags & 2), **json.loads(data[5:5 + n])})
        data = data[5 + n:]
    return frames


def test_hostile_strings_are_invalid_arguments(sbx: Sandbox, daemon, e2b_env) -> None:  # noqa: ANN001
    key = {"X-API-KEY": e2b_env["E2B_API_KEY"], "Content-Type": "application/json"}
    for body in ('{"templateID": "base", "metadata": {"a": "\\ud903"}}',
                 '{"templateID": "base", "envVars": {"A": "x\\u0000"}}',
                 '{"templateID": "ba\\u0000se"}', '{"templateID": "base", "metadata": {"a": 1}}'):
        r = httpx.post(f"{daemon.url}/v2/sandboxes", headers=key, content=body)
        assert r.status_code == 400 and r.json()["code"] == 400, (body, r.text)
    assert httpx.get(f"{daemon.url}/v2/sandboxes", headers=key).status_code == 200
    for proc in ({"cmd": "/bin/echo", "args": ["a\0b"]}, {"cmd": "/bin/echo", "args": ["\ud903"]},
                 {"cmd": "/bin/true", "envs": {"A": "\0"}}, {"cmd": "/bin/true", "envs": {"A=B": "c"}},
                 {"cmd": "/bin/true", "cwd": "/tm\0p"}, {"cmd": ""}):
        frames = _stream(daemon, sbx, "process.Process/Start", {"process": proc, "stdin": False})
        assert frames[-1]["end"] and frames[-1]["error"]["code"] == "invalid_argument", (proc, frames)
    r = _envd(daemon, sbx.sandbox_id, sbx._envd_access_token, "/filesystem.Filesystem/Stat", {"path": "/tm\0p"})
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"
    frames = _stream(daemon, sbx, "process.Process/Start", {"process": {"cmd": "/bin/echo", "args": ["ok"]}})
    assert [next(iter(f["event"])) for f in frames[:-1]] == ["start", "data", "end"]
    assert base64.b64decode(frames[1]["event"]["data"]["stdout"]) == b"ok\n" and frames[-1] == {"end": True}


# --- get_host --------------------------------------------------------------------------------------

ECHO_SERVER = r'''
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = f"path={self.path} host={self.headers.get('Host')} token={self.headers.get('X-Access-Token')}".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        if self.headers.get("Transfer-Encoding") == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline(), 16)
                if not size:
                    self.rfile.readline(); break
                data += self.rfile.read(size); self.rfile.readline()
        else:
            data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.send_response(201); self.send_header("Content-Length", str(len(data)))
        self.send_header("X-Echo", "yes"); self.end_headers(); self.wfile.write(data[::-1])
    def log_message(self, *a): pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
'''


def test_get_host_reaches_a_port(sbx: Sandbox, daemon) -> None:  # noqa: ANN001
    sbx.files.write("/tmp/www/index.txt", "served from the sandbox\n")
    sbx.commands.run("cd /tmp/www && python3 -m http.server 8000", background=True)
    host = sbx.get_host(8000)
    assert host == f"8000-{sbx.sandbox_id}.localhost:{daemon.url.rsplit(':', 1)[1]}"

    def fetch() -> httpx.Response | None:
        r = httpx.get(f"{daemon.url}/index.txt", headers={"Host": host}, timeout=10)
        return r if r.status_code == 200 else None
    r = _until(fetch)
    assert r.text == "served from the sandbox\n"
    listing = httpx.get(f"{daemon.url}/", headers={"Host": host}, timeout=10)
    assert listing.status_code == 200 and "index.txt" in listing.text
    missing = httpx.get(f"{daemon.url}/nope", headers={"Host": host}, timeout=10)
    assert missing.status_code == 404
    closed = httpx.get(f"{daemon.url}/", headers={"Host": sbx.get_host(8999)}, timeout=10)
    assert closed.status_code == 502 and "port is not open" in closed.json()["message"]


def test_get_host_bodies_both_ways(sbx: Sandbox, daemon) -> None:  # noqa: ANN001
    sbx.files.write("/tmp/echo_server.py", ECHO_SERVER)
    sbx.commands.run("python3 /tmp/echo_server.py 8001", background=True)
    host = sbx.get_host(8001)

    def fetch() -> httpx.Response | None:
        r = httpx.get(f"{daemon.url}/a/b?c=d%20e", headers={"Host": host}, timeout=10)
        return r if r.status_code == 200 else None
    r = _until(fetch)
    assert r.text == f"path=/a/b?c=d%20e host={host} token=None"
    payload = bytes(range(256)) * 4000
    r = httpx.post(f"{daemon.url}/echo", headers={"Host": host}, content=payload, timeout=30)
    assert r.status_code == 201 and r.headers["x-echo"] == "yes" and r.content == payload[::-1]

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(payload), 65536):
            yield payload[i:i + 65536]
    r = httpx.post(f"{daemon.url}/echo", headers={"Host": host}, content=chunks(), timeout=30)
    assert r.status_code == 201 and r.content == payload[::-1]


WS_ECHO_SERVER = r'''
import base64, hashlib, socket, struct, sys, threading
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
def frame(op, data):
    n = len(data)
    head = bytes([0x80 | op]) + (bytes([n]) if n < 126 else bytes([126]) + struct.pack("!H", n) if n < 65536
                                 else bytes([127]) + struct.pack("!Q", n))
    return head + data
def exact(c, n):
    b = b""
    while len(b) < n:
        x = c.recv(n - len(b))
        if not x: raise EOFError
        b += x
    return b
def serve(c):
    req = b""
    while b"\r\n\r\n" not in req: req += c.recv(4096)
    lines = req.decode().split("\r\n")
    hdr = {l.split(":", 1)[0].lower(): l.split(":", 1)[1].strip() for l in lines[1:] if ":" in l}
    acc = base64.b64encode(hashlib.sha1(hdr["sec-websocket-key"].encode() + GUID).digest()).decode()
    c.sendall(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Accept: {acc}\r\n\r\n").encode())
    c.sendall(frame(1, ("path " + lines[0].split()[1]).encode()))
    try:
        while True:
            b0, b1 = exact(c, 2)
            n = b1 & 127
            if n == 126:
                n = struct.unpack("!H", exact(c, 2))[0]
            elif n == 127:
                n = struct.unpack("!Q", exact(c, 8))[0]
            mask = exact(c, 4)
            data = bytes(x ^ mask[i % 4] for i, x in enumerate(exact(c, n)))
            op = b0 & 15
            if op == 8:
                c.sendall(frame(8, data[:2])); return
            c.sendall(frame(op, data[::-1] if op == 1 else data + b"!"))
    except EOFError:
        pass
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen()
while True:
    conn, _ = s.accept(); threading.Thread(target=serve, args=(conn,), daemon=True).start()
'''


def test_get_host_websocket(sbx: Sandbox, daemon) -> None:  # noqa: ANN001
    import socket

    from websockets.sync.client import connect as ws_connect

    sbx.files.write("/tmp/ws_echo.py", WS_ECHO_SERVER)
    sbx.commands.run("python3 /tmp/ws_echo.py 8765", background=True)
    host = sbx.get_host(8765)
    port = int(daemon.url.rsplit(":", 1)[1])

    probe = "python3 -c 'import socket; socket.create_connection((\"127.0.0.1\", 8765)).close()' && echo up || true"
    _until(lambda: sbx.commands.run(probe).stdout.strip() == "up")
    with ws_connect(f"ws://{host}/chat?room=1", sock=socket.create_connection(("127.0.0.1", port))) as ws:
        assert ws.recv(timeout=10) == "path /chat?room=1"
        ws.send("hello")
        assert ws.recv(timeout=10) == "olleh"
        ws.send(b"\x00\x01" * 40000)
        assert ws.recv(timeout=10) == b"\x00\x01" * 40000 + b"!"


def test_get_host_traffic_token_when_not_public(new_sbx, daemon) -> None:  # noqa: ANN001
    sb = new_sbx(network={"allow_public_traffic": False})
    sb.commands.run("cd /tmp && python3 -m http.server 8002", background=True)
    host = sb.get_host(8002)
    token = sb.traffic_access_token
    assert token

    def ok() -> bool:
        return httpx.get(f"{daemon.url}/", headers={"Host": host, "e2b-traffic-access-token": token},
                         timeout=10).status_code == 200
    _until(ok)
    assert httpx.get(f"{daemon.url}/", headers={"Host": host}, timeout=10).status_code == 401
    bad = {"Host": host, "e2b-traffic-access-token": token[:-1] + ("0" if token[-1] != "0" else "1")}
    assert httpx.get(f"{daemon.url}/", headers=bad, timeout=10).status_code == 401


# --- isolation -------------------------------------------------------------------------------------

def test_sandboxes_never_see_each_other(new_sbx, daemon) -> None:  # noqa: ANN001
    a, b = new_sbx(), new_sbx()
    a.files.write("/tmp/only-in-a", "A")
    ha = a.commands.run("sleep 120", background=True)
    assert not b.files.exists("/tmp/only-in-a")
    assert ha.pid not in {p.pid for p in b.commands.list()} or b.commands.run(
        f"cat /proc/{ha.pid}/cmdline 2>/dev/null | tr '\\0' ' '").stdout.strip() != "sleep 120"
    assert a.commands.run("cat /tmp/only-in-a").stdout == "A"
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(8) as pool:  # concurrent traffic to both never mixes
        cmd = "cat /etc/hostname; echo {}; cat /tmp/only-in-a 2>/dev/null; true"
        jobs = [(sb, i, pool.submit(sb.commands.run, cmd.format(i))) for i in range(6) for sb in (a, b)]
        reads = [(sb, pool.submit(sb.files.exists, "/tmp/only-in-a")) for sb in (a, b) for _ in range(4)]
    for sb, i, job in jobs:
        assert job.result().stdout == f"{sb.sandbox_id}\n{i}\n" + ("A" if sb is a else "")
    assert all(job.result() == (sb is a) for sb, job in reads)
    wa = a.files.watch_dir("/tmp")
    token_a, token_b = a._envd_access_token, b._envd_access_token
    assert token_a and token_b and token_a != token_b
    stat = "/filesystem.Filesystem/Stat"
    assert _envd(daemon, a.sandbox_id, token_a, stat, {"path": "/tmp/only-in-a"}).status_code == 200
    assert _envd(daemon, b.sandbox_id, token_a, stat, {"path": "/tmp"}).status_code == 401  # ids swapped
    assert _envd(daemon, a.sandbox_id, token_b, stat, {"path": "/tmp"}).status_code == 401
    assert _envd(daemon, a.sandbox_id, None, stat, {"path": "/tmp"}).status_code == 401
    assert _envd(daemon, "zz0notasandbox", token_a, stat, {"path": "/"}).status_code == 401
    r = _envd(daemon, b.sandbox_id, token_b, "/filesystem.Filesystem/GetWatcherEvents", {"watcherId": wa._watcher_id})
    assert r.status_code == 404  # A's watcher does not exist in B
    swapped = {"E2b-Sandbox-Id": b.sandbox_id, "E2b-Sandbox-Port": str(ENVD), "X-Access-Token": token_a}
    files = httpx.get(f"{daemon.url}/files", params={"path": "/tmp/only-in-a"}, timeout=10, headers=swapped)
    assert files.status_code == 401
    wa.stop()


def test_another_key_sees_nothing(sbx: Sandbox, daemon) -> None:  # noqa: ANN001
    store = KeyStore(__import__("shoal.settings", fromlist=["Settings"]).Settings().db_path)
    key, secret = store.create(name="e2b-other")
    try:
        other = e2b_form(secret)
        with pytest.raises(SandboxNotFoundException):
            Sandbox.get_info(sbx.sandbox_id, api_key=other)
        assert sbx.sandbox_id not in {s.sandbox_id for s in Sandbox.list(api_key=other).next_items()}
        assert Sandbox.kill(sbx.sandbox_id, api_key=other) is False
        with pytest.raises(SandboxException):
            Sandbox.connect(sbx.sandbox_id, api_key=other)
        assert sbx.is_running()
    finally:
        store.revoke(key.id)


def test_signed_file_urls(sbx: Sandbox, daemon) -> None:  # noqa: ANN001
    """download_url()/upload_url() name no sandbox: the signature (made with its token) does."""
    sbx.files.write("/tmp/signed.txt", "signed")
    url = sbx.download_url("/tmp/signed.txt")
    assert url.startswith(daemon.url + "/files?")
    r = httpx.get(url, timeout=10)
    assert r.status_code == 200 and r.text == "signed"
    assert httpx.get(url.replace("signed.txt", "other.txt"), timeout=10).status_code == 401
    expiring = sbx.download_url("/tmp/signed.txt", use_signature_expiration=60)
    assert httpx.get(expiring, timeout=10).text == "signed"
    up = sbx.upload_url("/tmp/uploaded.txt")
    r = httpx.post(up, files={"file": ("uploaded.txt", b"via signed url")}, timeout=10)
    assert r.status_code == 200, r.text
    assert sbx.files.read("/tmp/uploaded.txt") == "via signed url"
    assert sbx.files.get_info("/tmp/uploaded.txt").owner == "user"
    assert httpx.post(url, files={"file": ("x", b"x")}, timeout=10).status_code == 401  # a read URL cannot write


# --- async -----------------------------------------------------------------------------------------

def test_async_sdk(e2b_env, daemon) -> None:  # noqa: ANN001
    async def main() -> None:
        sb = await AsyncSandbox.create(TEMPLATE, envs={"A": "1"}, metadata={"suite": "e2b-async"})
        try:
            out: list[str] = []
            r = await sb.commands.run("echo $A; whoami", on_stdout=out.append)
            assert r.stdout == "1\nuser\n" and "".join(out) == r.stdout
            with pytest.raises(CommandExitException):
                await sb.commands.run("exit 9")
            h = await sb.commands.run("sleep 60", background=True)
            assert h.pid in {p.pid for p in await sb.commands.list()}
            assert await h.kill() is True
            with pytest.raises(CommandExitException) as info:
                await h.wait()
            assert info.value.exit_code == -1
            h = await sb.commands.run("read x; echo got $x", background=True, stdin=True)
            await h.send_stdin("abc\n")
            assert (await h.wait()).stdout == "got abc\n"
            with pytest.raises(TimeoutException):
                await sb.commands.run("sleep 20", timeout=1)

            await sb.files.write("a/b.txt", "async text")
            assert await sb.files.read("a/b.txt") == "async text"
            assert bytes(await sb.files.read("a/b.txt", format="bytes")) == b"async text"
            assert await sb.files.exists("a/b.txt")
            assert [e.name for e in await sb.files.list("a")] == ["b.txt"]
            assert await sb.files.make_dir("a/c") is True
            await sb.files.rename("a/b.txt", "a/c/d.txt")
            assert (await sb.files.get_info("a/c/d.txt")).size == len("async text")
            await sb.files.remove("a")
            assert not await sb.files.exists("a")

            await sb.files.make_dir("w")
            events: list = []
            handle = await sb.files.watch_dir("w", on_event=events.append)
            await sb.files.write("w/x.txt", "x")
            for _ in range(200):
                if any(e.name == "x.txt" for e in events):
                    break
                await asyncio.sleep(0.05)
            await handle.stop()
            assert any(e.name == "x.txt" and e.type == FilesystemEventType.CREATE for e in events)

            seen = bytearray()
            term = await sb.pty.create(PtySize(rows=20, cols=60), on_data=seen.extend)
            await sb.pty.send_stdin(term.pid, b"stty size\n")
            for _ in range(200):
                if b"20 60" in seen:
                    break
                await asyncio.sleep(0.05)
            assert b"20 60" in seen
            await sb.pty.resize(term.pid, PtySize(rows=21, cols=61))
            await sb.pty.send_stdin(term.pid, b"stty size\n")
            for _ in range(200):
                if b"21 61" in seen:
                    break
                await asyncio.sleep(0.05)
            assert b"21 61" in seen
            assert await sb.pty.kill(term.pid) is True

            listed = await (AsyncSandbox.list(query=SandboxQuery(metadata={"suite": "e2b-async"}))).next_items()
            assert [s.sandbox_id for s in listed] == [sb.sandbox_id]
            assert await sb.pause() is True
            assert (await sb.get_info()).state == SandboxState.PAUSED
            again = await AsyncSandbox.connect(sb.sandbox_id)
            assert (await again.commands.run("echo back")).stdout == "back\n"
            host = sb.get_host(8123)
            await sb.commands.run("cd /tmp && python3 -m http.server 8123", background=True)
            async with httpx.AsyncClient() as client:
                for _ in range(200):
                    resp = await client.get(f"{daemon.url}/", headers={"Host": host})
                    if resp.status_code == 200:
                        break
                    await asyncio.sleep(0.05)
                assert resp.status_code == 200
        finally:
            assert await sb.kill() is True
        assert await AsyncSandbox.kill(sb.sandbox_id) is False

    asyncio.run(main())


# --- shoal e2b-env ---------------------------------------------------------------------------------

def test_e2b_env_command(daemon) -> None:  # noqa: ANN001
    import subprocess

    out = subprocess.run(["/opt/shoal/venv/bin/shoal", "e2b-env"], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "SHOAL_URL": daemon.url, "SHOAL_API_KEY": daemon.key})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines == [f"export E2B_API_KEY={e2b_form(daemon.key)}", f"export E2B_API_URL={daemon.url}",
                     f"export E2B_SANDBOX_URL={daemon.url}"]
