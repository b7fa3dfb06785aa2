"""The Python SDK (``from shoal import Sandbox, AsyncSandbox``) against a real daemon on loopback,
with real sandboxes: no mocks. The sync and async twins run the same scenarios."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from shoal import AsyncSandbox, Sandbox
from shoal.errors import (
    Conflict,
    DaemonUnreachable,
    InvalidRequest,
    NotFound,
    ShoalError,
    Unauthorized,
)

ALL_BYTES = bytes(range(256))
PRINT_ALL_BYTES = "i=0; while [ $i -lt 256 ]; do printf \"\\\\$(printf %03o $i)\"; i=$((i+1)); done"
BIG = 5 * 1024 * 1024


@pytest.fixture(scope="module")
def conn(daemon) -> dict:  # noqa: ANN001
    return {"url": daemon.url, "api_key": daemon.key}


@pytest.fixture(scope="module")
def sb(conn: dict) -> Iterator[Sandbox]:
    box = Sandbox.create(timeout=600, metadata={"suite": "test_sdk"}, **conn)
    try:
        yield box
    finally:
        box.kill()
        box.close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _big_chunks(seed: bytes) -> Iterator[bytes]:
    """5 MiB of deterministic, incompressible-looking bytes in 64 KiB pieces."""
    block = hashlib.sha256(seed).digest() * 2048  # 64 KiB
    for i in range(BIG // len(block)):
        yield bytes([i % 256]) + block[1:]


def _big_digest(seed: bytes) -> str:
    h = hashlib.sha256()
    for chunk in _big_chunks(seed):
        h.update(chunk)
    return h.hexdigest()


# --- sync: sandboxes ---------------------------------------------------------------------------

def test_create_info_and_kill(conn: dict):
    box = Sandbox.create(cpu=0.5, memory_mb=256, disk_mb=64, timeout=120, env={"GREETING": "hi there"},
                         metadata={"owner": "test"}, **conn)
    try:
        info = box.info()
        assert (info.id, info.state, info.cpu, info.memory_mb, info.disk_mb) == (box.id, "running", 0.5, 256, 64)
        assert info.metadata == {"owner": "test"} and info.template == "minimal"
        assert 100 < (info.expires_at - info.created_at).total_seconds() <= 121
        assert box.commands.run("echo $GREETING").stdout == "hi there\n"  # sandbox-wide env
        assert box.is_running()
    finally:
        assert box.kill() is True
    assert box.kill() is False  # gone already
    with pytest.raises(NotFound):
        box.info()
    with pytest.raises(NotFound):
        Sandbox.connect(box.id, **conn)
    box.close()


def test_class_level_actions_by_id(conn: dict):
    """E2B's shape: ``Sandbox.kill(id)``, ``Sandbox.get_info(id)``, ``Sandbox.set_timeout(id, s)``."""
    box = Sandbox.create(timeout=60, **conn)
    box.close()
    assert Sandbox.get_info(box.id, **conn).state == "running"
    assert Sandbox.set_timeout(box.id, 500, **conn).expires_at is not None
    assert Sandbox.pause(box.id, **conn).state == "paused"
    assert Sandbox.resume(box.id, **conn).state == "running"
    assert Sandbox.kill(box.id, **conn) is True
    assert Sandbox.kill(box.id, **conn) is False


def test_context_manager_kills_on_exit(conn: dict):
    with Sandbox.create(timeout=60, **conn) as box:
        assert box.commands.run(["true"]).exit_code == 0
        sid = box.id
    with pytest.raises(NotFound):
        Sandbox.connect(sid, **conn)


def test_context_manager_kills_on_error_too(conn: dict):
    with pytest.raises(ZeroDivisionError), Sandbox.create(timeout=60, **conn) as box:
        sid = box.id
        1 / 0  # noqa: B018
    with pytest.raises(NotFound):
        Sandbox.connect(sid, **conn)


def test_connect_to_an_existing_sandbox(conn: dict, sb: Sandbox):
    other = Sandbox.connect(sb.id, **conn)
    try:
        assert other.id == sb.id and other.info().state == "running"
        other.files.write("/tmp/from-other", "x")
        assert sb.files.read("/tmp/from-other") == "x"
    finally:
        other.close()  # closes the client only
    assert sb.info().state == "running"


def test_list_filters_by_metadata_and_state(conn: dict):
    tag = secrets.token_hex(4)
    a = Sandbox.create(timeout=120, metadata={"run": tag, "role": "a"}, **conn)
    b = Sandbox.create(timeout=120, metadata={"run": tag, "role": "b"}, **conn)
    try:
        assert {i.id for i in Sandbox.list(metadata={"run": tag}, **conn)} == {a.id, b.id}
        assert [i.id for i in Sandbox.list(metadata={"run": tag, "role": "b"}, **conn)] == [b.id]
        b.pause()
        assert [i.id for i in Sandbox.list(state="paused", metadata={"run": tag}, **conn)] == [b.id]
        assert [i.id for i in Sandbox.list(state=["running"], metadata={"run": tag}, **conn)] == [a.id]
        assert Sandbox.list(metadata={"run": "no-such-" + tag}, **conn) == []
    finally:
        a.kill()
        b.kill()
    assert Sandbox.list(metadata={"run": tag}, **conn) == []


def test_set_timeout_pause_and_resume(conn: dict):
    with Sandbox.create(timeout=30, **conn) as box:
        before = box.info().expires_at
        after = box.set_timeout(600).expires_at
        assert (after - before).total_seconds() > 500
        box.commands.run("echo kept > /tmp/state")
        h = box.commands.run("i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.05; done",
                             background=True)
        assert box.pause().state == "paused"
        with pytest.raises(Conflict):
            box.commands.run("true")
        with pytest.raises(Conflict):
            box.pause()
        time.sleep(0.3)
        assert box.resume().state == "running"
        first = box.files.read("/tmp/counter")
        time.sleep(0.3)
        assert box.files.read("/tmp/counter") != first  # the loop runs again
        assert box.files.read("/tmp/state") == "kept\n"  # memory and files stayed
        h.kill()
        with pytest.raises(Conflict):
            box.resume()


def test_sandbox_expires_after_its_timeout(conn: dict):
    box = Sandbox.create(timeout=1, **conn)
    deadline = time.monotonic() + 15

    def gone() -> bool:  # not running is not enough: it may still be stopping (its layer being unmounted)
        try:
            box.info()
            return False
        except NotFound:
            return True
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not box.is_running()
    with pytest.raises(NotFound):
        box.info()
    box.close()


# --- sync: commands ------------------------------------------------------------------------------

def test_run_result(sb: Sandbox):
    r = sb.commands.run("echo out; echo err >&2; exit 3")
    assert (r.exit_code, r.stdout, r.stderr, r.timed_out, r.signal) == (3, "out\n", "err\n", False, None)
    assert r.pid > 0 and not r.ok
    r = sb.commands.run(["sh", "-c", 'echo "$A-$B"; pwd; id -un'], env={"A": "1", "B": "two"}, cwd="/tmp")
    assert r.stdout == "1-two\n/tmp\nroot\n"


def test_run_as_another_user(conn: dict):
    with Sandbox.create(template="base", timeout=120, **conn) as box:
        assert box.commands.run("id -un; echo $HOME", user="user").stdout == "user\n/home/user\n"


def test_callbacks_get_text_as_it_arrives(sb: Sandbox):
    seen: list[tuple[str, str, float]] = []
    r = sb.commands.run("echo one; sleep 0.4; echo two >&2; printf '\\303'; sleep 0.1; printf '\\251\\n'",
                        on_stdout=lambda s: seen.append(("out", s, time.monotonic())),
                        on_stderr=lambda s: seen.append(("err", s, time.monotonic())))
    assert r.exit_code == 0 and r.stdout == "one\né\n" and r.stderr == "two\n"
    assert "".join(s for k, s, _ in seen if k == "out") == "one\né\n"  # a split UTF-8 character stays whole
    assert "".join(s for k, s, _ in seen if k == "err") == "two\n"
    assert "\ufffd" not in "".join(s for _, s, _ in seen)
    first_out = next(t for k, s, t in seen if k == "out")
    first_err = next(t for k, s, t in seen if k == "err")
    assert first_err - first_out > 0.3  # streamed, not delivered at the end


def test_binary_output_is_byte_exact(sb: Sandbox):
    r = sb.commands.run(PRINT_ALL_BYTES, binary=True)
    assert r.stdout_bytes == ALL_BYTES
    got: list[str] = []
    r = sb.commands.run(PRINT_ALL_BYTES, on_stdout=got.append)
    assert r.stdout_bytes == ALL_BYTES  # streamed whenever there are callbacks
    plain = sb.commands.run(PRINT_ALL_BYTES)  # the one-request path returns text
    assert plain.stdout == ALL_BYTES.decode("utf-8", "replace")


def test_stdin_forms(sb: Sandbox):
    assert sb.commands.run(["cat"], stdin="hello\n").stdout == "hello\n"
    assert sb.commands.run(["cat"], stdin=ALL_BYTES).stdout_bytes == ALL_BYTES
    assert sb.commands.run(["cat"], stdin=io.BytesIO(b"from a file")).stdout == "from a file"
    chunks = [os.urandom(100_000) for _ in range(12)]  # > 1 MiB, streamed
    r = sb.commands.run(["sha256sum"], stdin=iter(chunks))
    assert r.stdout.split()[0] == hashlib.sha256(b"".join(chunks)).hexdigest()
    r = sb.commands.run(["sh", "-c", "read a; echo got:$a; cat >&2"], stdin="x\nrest\n")
    assert (r.stdout, r.stderr) == ("got:x\n", "rest\n")
    assert sb.commands.run(["wc", "-c"], stdin=b"").stdout.strip() == "0"


def test_timeout_kills_the_command(sb: Sandbox):
    t = time.monotonic()
    r = sb.commands.run("echo started; sleep 30", timeout=0.5)
    assert time.monotonic() - t < 5
    assert r.timed_out and r.exit_code == 137 and r.signal == 9 and r.stdout == "started\n"
    r = sb.commands.run(["cat"], stdin=True, timeout=0.5)  # also over the WebSocket path
    assert r.timed_out


def test_command_that_cannot_run(sb: Sandbox):
    with pytest.raises(NotFound, match="cannot execute"):
        sb.commands.run(["/no/such/binary"])
    with pytest.raises(NotFound, match="cannot execute"):
        sb.commands.run(["/no/such/binary"], stdin="x")
    with pytest.raises(NotFound, match="cannot execute"):
        sb.commands.run(["/no/such/binary"], background=True)
    with pytest.raises(InvalidRequest):
        sb.commands.run(["true"], cwd="/no/such/dir")
    with pytest.raises(InvalidRequest):
        sb.commands.run([])


def test_background_iterate_disconnect_connect_and_kill(sb: Sandbox):
    h = sb.commands.run("i=0; while true; do i=$((i+1)); echo line$i; sleep 0.05; done", background=True)
    assert h.pid > 0 and h.exit_code is None
    it = iter(h)
    assert next(it).data.startswith(b"line1")
    assert h.pid in [p.pid for p in sb.commands.list()]
    h.disconnect()  # it keeps running
    time.sleep(0.2)
    assert h.pid in [p.pid for p in sb.commands.list()]
    seen: list[str] = []
    again = sb.commands.connect(h.pid, on_stdout=seen.append)
    follow = iter(again)
    line = next(follow).text
    assert line.startswith("line") and line != "line1\n"  # output from now on
    assert again.kill() is True
    r = again.wait(timeout=10)
    assert r.signal == 9 and r.exit_code == 137 and r.stdout.startswith(line)
    assert seen and "".join(seen) == r.stdout
    assert h.pid not in [p.pid for p in sb.commands.list()]
    assert sb.commands.kill(h.pid) is False
    with pytest.raises(NotFound):
        sb.commands.connect(h.pid)


def test_background_collects_everything_without_being_read(sb: Sandbox):
    h = sb.commands.run("head -c 3000000 /dev/zero; echo done >&2", background=True)
    r = h.wait(timeout=30)  # nobody iterated: the handle read it all anyway
    assert len(r.stdout_bytes) == 3_000_000 and r.stderr == "done\n" and r.exit_code == 0
    assert sum(len(o.data) for o in h if o.stream == "stdout") == 3_000_000  # and can replay it


def test_background_stdin_by_pid(sb: Sandbox):
    h = sb.commands.run(["cat"], stdin=True, background=True)
    sb.commands.send_stdin(h.pid, "first\n")
    h.send_stdin(b"\xffsecond\n")
    h.close_stdin()
    r = h.wait(timeout=10)
    assert r.exit_code == 0 and r.stdout_bytes == b"first\n\xffsecond\n"


def test_signal_other_than_kill(sb: Sandbox):
    h = sb.commands.run("trap 'echo got TERM; exit 7' TERM; echo ready; while true; do sleep 0.05; done",
                        background=True)
    assert next(iter(h)).text == "ready\n"
    assert sb.commands.kill(h.pid, signal=15) is True
    r = h.wait(timeout=10)
    assert (r.exit_code, r.stdout) == (7, "ready\ngot TERM\n")


# --- sync: files ------------------------------------------------------------------------------------

def test_files_round_trip(sb: Sandbox):
    d = f"/tmp/rt-{secrets.token_hex(3)}"
    assert sb.files.make_dir(d) is True
    assert sb.files.make_dir(d) is False  # exists already
    e = sb.files.write(f"{d}/a.txt", "héllo\n")
    assert (e.name, e.type, e.size, e.path) == ("a.txt", "file", 7, f"{d}/a.txt")
    assert sb.files.read(f"{d}/a.txt") == "héllo\n"
    assert sb.files.read(f"{d}/a.txt", format="bytes") == "héllo\n".encode()
    sb.files.write(f"{d}/bin", ALL_BYTES, mode=0o750)
    st = sb.files.stat(f"{d}/bin")
    assert st.mode == 0o750 and st.size == 256 and st.permissions == "-rwxr-x---"
    assert sb.files.read_bytes(f"{d}/bin") == ALL_BYTES
    sb.files.write(f"{d}/a.txt", "more\n", append=True)
    assert sb.files.read(f"{d}/a.txt") == "héllo\nmore\n"
    sb.files.write(f"{d}/deep/er/c.txt", b"c")  # parents are created
    names = {e.name for e in sb.files.list(d)}
    assert names == {"a.txt", "bin", "deep"}
    assert f"{d}/deep/er/c.txt" in {e.path for e in sb.files.list(d, depth=3)}
    moved = sb.files.move(f"{d}/a.txt", f"{d}/b.txt")
    assert moved.path == f"{d}/b.txt"
    assert not sb.files.exists(f"{d}/a.txt") and sb.files.exists(f"{d}/b.txt")
    sb.files.remove(f"{d}/b.txt")
    assert not sb.files.exists(f"{d}/b.txt")
    sb.files.remove(d)  # a directory, with what is left in it
    assert not sb.files.exists(d)
    assert sb.files.write("relative.txt", "r").path == "/root/relative.txt"  # relative: from /root
    with pytest.raises(NotFound):
        sb.files.read("/no/such/file")
    with pytest.raises(NotFound):
        sb.files.read_stream("/no/such/file")  # raised before the first chunk
    with pytest.raises(NotFound):
        sb.files.stat("/no/such/file")


def test_five_mib_streamed_both_ways(sb: Sandbox):
    seed = secrets.token_bytes(8)
    e = sb.files.write("/tmp/big.bin", _big_chunks(seed))  # a generator: streamed up
    assert e.size == BIG
    r = sb.commands.run("sha256sum /tmp/big.bin")
    assert r.stdout.split()[0] == _big_digest(seed)  # really on the sandbox's disk
    h = hashlib.sha256()
    n = 0
    for chunk in sb.files.read_stream("/tmp/big.bin"):
        h.update(chunk)
        n += 1
    assert h.hexdigest() == _big_digest(seed) and n > 1  # streamed down in chunks
    assert hashlib.sha256(sb.files.read_bytes("/tmp/big.bin")).hexdigest() == _big_digest(seed)
    with open("/dev/zero", "rb") as f:  # a file object is streamed too
        limited = io.BytesIO(f.read(BIG))
    assert sb.files.write("/tmp/zero.bin", limited).size == BIG


def test_watch_sees_changes(sb: Sandbox):
    d = f"/tmp/watch-{secrets.token_hex(3)}"
    sb.files.make_dir(d)
    events = []
    with sb.files.watch(d) as w:
        def collect() -> None:
            for ev in w:
                events.append(ev)
                if len(events) >= 2:
                    return
        t = threading.Thread(target=collect, daemon=True)
        t.start()
        sb.files.write(f"{d}/new.txt", "1")
        sb.files.remove(f"{d}/new.txt")
        t.join(10)
    assert not t.is_alive(), events
    assert events[0].type == "create" and events[0].path == f"{d}/new.txt" and events[0].name == "new.txt"
    assert any(e.type == "remove" for e in events[1:]) or events[1].path == f"{d}/new.txt"


def test_watch_recursive(sb: Sandbox):
    d = f"/tmp/watchr-{secrets.token_hex(3)}"
    sb.files.make_dir(f"{d}/sub")
    w = sb.files.watch(d, recursive=True)
    sb.files.write(f"{d}/sub/inner.txt", "x")
    ev = next(iter(w))
    w.close()
    assert ev.path == f"{d}/sub/inner.txt"
    with pytest.raises(NotFound):
        sb.files.watch("/no/such/dir")


# --- sync: pty ------------------------------------------------------------------------------------------

def test_pty_size_resize_input_and_exit_code(sb: Sandbox):
    seen: list[bytes] = []
    with sb.pty.create(["/bin/sh"], cols=100, rows=30, on_data=seen.append) as term:
        assert term.pid > 0
        term.send(b"stty size\n")
        buf = b""
        for data in term:
            buf += data
            if b"30 100" in buf:
                break
        term.resize(132, 43)
        term.send("stty size; tty; exit 5\n")
        assert term.wait(timeout=10) == 5
        out = term.result.stdout_bytes
        assert b"43 132" in out and b"/dev/pts/" in out
        assert b"".join(seen) == out


def test_pty_kill_and_default_shell(sb: Sandbox):
    term = sb.pty.create(cols=80, rows=24)  # default: a login shell
    term.send(b"echo $0\n")
    term.kill()
    assert term.wait(timeout=10) == 137
    assert b"sh" in term.result.stdout_bytes
    with pytest.raises(NotFound, match="cannot execute"):
        sb.pty.create(["/no/such/shell"])


# --- sync: errors and settings -------------------------------------------------------------------------

def test_errors_map_to_shoal_errors(conn: dict, sb: Sandbox):
    with pytest.raises(NotFound, match="does not exist"):
        Sandbox.connect("nosuchsandbox1", **conn)
    with pytest.raises(NotFound):
        Sandbox.create(template="no-such-template", **conn)
    with pytest.raises(InvalidRequest, match="cpu"):
        Sandbox.create(cpu=1000, **conn)
    with pytest.raises(InvalidRequest):
        Sandbox.create(timeout=0, **conn)
    with pytest.raises(Unauthorized):
        Sandbox.list(url=conn["url"], api_key="shoal_" + "0" * 40)
    with pytest.raises(Unauthorized):
        Sandbox.connect(sb.id, url=conn["url"], api_key="shoal_" + "0" * 40)
    for exc in (NotFound, InvalidRequest, Unauthorized, Conflict, DaemonUnreachable):
        assert issubclass(exc, ShoalError)


def test_no_daemon_says_how_to_start_one(conn: dict):
    url = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(DaemonUnreachable) as info:
        Sandbox.create(url=url, api_key=conn["api_key"])
    assert url in info.value.message and f"shoal serve --port {url.rsplit(':', 1)[1]}" in info.value.message


def test_settings_come_from_the_environment(conn: dict, sb: Sandbox, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SHOAL_URL", conn["url"])
    monkeypatch.setenv("SHOAL_API_KEY", conn["api_key"])
    other = Sandbox.connect(sb.id)
    assert other.commands.run("echo env").stdout == "env\n"
    other.close()
    monkeypatch.setenv("SHOAL_API_KEY", "shoal_" + "1" * 40)
    with pytest.raises(Unauthorized):
        Sandbox.connect(sb.id)
    monkeypatch.delenv("SHOAL_API_KEY")  # a loopback daemon: the local key (we are root)
    assert Sandbox.connect(sb.id).id == sb.id
    monkeypatch.setenv("SHOAL_URL", "http://192.0.2.1:4040")  # the local key never goes elsewhere
    with pytest.raises(Unauthorized, match="SHOAL_API_KEY"):
        Sandbox.connect(sb.id)


def test_transport_is_injectable(conn: dict, sb: Sandbox):
    calls: list[str] = []

    class Recording(httpx.HTTPTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            calls.append(f"{request.method} {request.url.path}")
            return super().handle_request(request)

    other = Sandbox.connect(sb.id, transport=Recording(), **conn)
    other.commands.run("true")
    other.close()
    assert calls == [f"GET /v1/sandboxes/{sb.id}", f"POST /v1/sandboxes/{sb.id}/exec"]


def test_import_is_lazy():
    code = ("import sys, shoal; assert 'httpx' not in sys.modules, 'eager'; "
            "from shoal import Sandbox, AsyncSandbox; assert 'httpx' in sys.modules; print(shoal.__version__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


# --- async twins -----------------------------------------------------------------------------------------

def test_async_lifecycle_and_context_manager(conn: dict):
    async def main() -> str:
        tag = secrets.token_hex(4)
        async with await AsyncSandbox.create(timeout=120, metadata={"async": tag}, **conn) as box:
            assert (await box.info()).state == "running"
            assert [i.id for i in await AsyncSandbox.list(metadata={"async": tag}, **conn)] == [box.id]
            assert (await box.set_timeout(300)).expires_at is not None
            assert (await box.pause()).state == "paused"
            with pytest.raises(Conflict):
                await box.commands.run("true")
            assert (await box.resume()).state == "running"
            other = await AsyncSandbox.connect(box.id, **conn)
            assert (await other.commands.run("echo hi")).stdout == "hi\n"
            await other.close()
            return box.id
    sid = asyncio.run(main())

    async def gone() -> None:
        with pytest.raises(NotFound):
            await AsyncSandbox.connect(sid, **conn)
        assert await AsyncSandbox.kill(sid, **conn) is False
        box = await AsyncSandbox.create(timeout=60, **conn)
        await box.close()
        assert (await AsyncSandbox.get_info(box.id, **conn)).state == "running"
        assert await AsyncSandbox.kill(box.id, **conn) is True
    asyncio.run(gone())


def test_async_commands(conn: dict, sb: Sandbox):
    async def main() -> None:
        box = await AsyncSandbox.connect(sb.id, **conn)
        try:
            r = await box.commands.run("echo out; echo err >&2; exit 4")
            assert (r.exit_code, r.stdout, r.stderr) == (4, "out\n", "err\n")
            seen: list[str] = []
            r = await box.commands.run(PRINT_ALL_BYTES, on_stdout=seen.append)
            assert r.stdout_bytes == ALL_BYTES and "".join(seen) == ALL_BYTES.decode("utf-8", "replace")
            assert (await box.commands.run(PRINT_ALL_BYTES, binary=True)).stdout_bytes == ALL_BYTES
            assert (await box.commands.run(["cat"], stdin=ALL_BYTES)).stdout_bytes == ALL_BYTES

            async def agen() -> object:
                for i in range(5):
                    yield f"{i}\n".encode()
            assert (await box.commands.run(["cat"], stdin=agen())).stdout == "0\n1\n2\n3\n4\n"
            r = await box.commands.run("sleep 30", timeout=0.5)
            assert r.timed_out and r.signal == 9
            with pytest.raises(NotFound, match="cannot execute"):
                await box.commands.run(["/no/such/binary"])

            h = await box.commands.run("i=0; while true; do i=$((i+1)); echo $i; sleep 0.05; done",
                                       background=True)
            async for out in h:
                assert out.text == "1\n"
                break
            await h.disconnect()
            again = await box.commands.connect(h.pid)
            async for out in again:
                assert out.text != "1\n"
                break
            assert h.pid in [p.pid for p in await box.commands.list()]
            assert await again.kill() is True
            r = await again.wait(timeout=10)
            assert r.signal == 9
            assert await box.commands.kill(h.pid) is False

            cat = await box.commands.run(["cat"], stdin=True, background=True)
            await box.commands.send_stdin(cat.pid, "a\n")
            await cat.send_stdin(b"b\n")
            await cat.close_stdin()
            assert (await cat.wait(timeout=10)).stdout == "a\nb\n"
        finally:
            await box.close()
    asyncio.run(main())


def test_async_files_watch_and_pty(conn: dict, sb: Sandbox):
    async def main() -> None:
        box = await AsyncSandbox.connect(sb.id, **conn)
        try:
            seed = secrets.token_bytes(8)

            async def upload() -> object:
                for chunk in _big_chunks(seed):
                    yield chunk
            assert (await box.files.write("/tmp/abig.bin", upload())).size == BIG
            h = hashlib.sha256()
            n = 0
            async for chunk in await box.files.read_stream("/tmp/abig.bin"):
                h.update(chunk)
                n += 1
            assert h.hexdigest() == _big_digest(seed) and n > 1
            assert hashlib.sha256(await box.files.read_bytes("/tmp/abig.bin")).hexdigest() == _big_digest(seed)
            await box.files.write("/tmp/at.txt", "text")
            assert await box.files.read("/tmp/at.txt") == "text"
            assert (await box.files.stat("/tmp/at.txt")).size == 4
            assert "at.txt" in {e.name for e in await box.files.list("/tmp")}
            assert await box.files.make_dir("/tmp/adir") is True
            assert await box.files.make_dir("/tmp/adir") is False
            await box.files.move("/tmp/at.txt", "/tmp/adir/at.txt")
            assert await box.files.exists("/tmp/adir/at.txt") and not await box.files.exists("/tmp/at.txt")
            await box.files.remove("/tmp/adir")
            assert not await box.files.exists("/tmp/adir")
            with pytest.raises(NotFound):
                await box.files.read("/no/such/file")

            d = f"/tmp/awatch-{secrets.token_hex(3)}"
            await box.files.make_dir(d)
            w = await box.files.watch(d)
            await box.files.write(f"{d}/f", "1")

            async def first() -> object:
                async for ev in w:
                    return ev
            ev = await asyncio.wait_for(first(), 10)
            await w.close()
            assert ev.type == "create" and ev.path == f"{d}/f"

            term = await box.pty.create(["/bin/sh"], cols=90, rows=20)
            await term.resize(120, 40)
            await term.send(b"stty size; exit 6\n")
            assert await term.wait(timeout=10) == 6
            assert b"40 120" in term.result.stdout_bytes
        finally:
            await box.close()
    asyncio.run(main())


def test_async_errors(conn: dict):
    async def main() -> None:
        with pytest.raises(NotFound):
            await AsyncSandbox.connect("nosuchsandbox2", **conn)
        with pytest.raises(InvalidRequest):
            await AsyncSandbox.create(memory_mb=1, **conn)
        with pytest.raises(Unauthorized):
            await AsyncSandbox.list(url=conn["url"], api_key="shoal_" + "0" * 40)
        with pytest.raises(DaemonUnreachable, match="shoal serve"):
            await AsyncSandbox.create(url=f"http://127.0.0.1:{_closed_port()}", api_key=conn["api_key"])
    asyncio.run(main())
