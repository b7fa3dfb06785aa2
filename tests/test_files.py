"""Files inside a sandbox through the agent: read, write, list, stat, mkdir, move, remove, watch,
path resolution that never reaches the host, and uploads that fail half-way. Real sandboxes."""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from pathlib import Path

import pytest

from shoal.agent import protocol as p
from shoal.errors import CapacityExceeded, Conflict, Forbidden, InvalidRequest, NotFound, ShoalError
from shoal.runtime.agent_client import AgentClient


def wait_for(predicate, timeout: float = 5.0, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


# --- read and write -----------------------------------------------------------------------------

def test_binary_round_trip(agent: AgentClient):
    data = secrets.token_bytes(5 * 1024 * 1024)
    entry = agent.write_file("/tmp/random.bin", data)
    assert entry["size"] == len(data) and entry["type"] == "file" and entry["path"] == "/tmp/random.bin"
    assert agent.read_file("/tmp/random.bin") == data
    chunks = list(agent.read_file_stream("/tmp/random.bin"))
    assert len(chunks) > 1 and b"".join(chunks) == data  # streamed, not one giant frame
    # the bytes really are on the sandbox's disk, not only in the agent
    r = agent.run(["sha256sum", "/tmp/random.bin"])
    assert r.stdout.split()[0] == hashlib.sha256(data).hexdigest()


def test_streamed_write_from_iterator(agent: AgentClient):
    parts = [b"alpha-", b"", b"\x00\xff" * 70000, secrets.token_bytes(300_000), b"-omega"]
    produced: list[int] = []

    def gen():
        for i, part in enumerate(parts):
            produced.append(i)
            yield part

    entry = agent.write_file("/tmp/streamed.bin", gen())
    assert produced == list(range(len(parts)))
    assert entry["size"] == sum(map(len, parts))
    assert agent.read_file("/tmp/streamed.bin") == b"".join(parts)


def test_text_file_seen_by_processes(agent: AgentClient):
    text = "héllo wörld ✓\nline 2\n"
    agent.write_file("/root/hello.txt", text.encode())
    assert agent.run(["cat", "/root/hello.txt"]).stdout == text
    agent.run(["sh", "-c", "echo from-shell > /root/shell.txt"])
    assert agent.read_file("/root/shell.txt") == b"from-shell\n"


def test_empty_file(agent: AgentClient):
    assert agent.write_file("/tmp/empty", b"")["size"] == 0
    assert agent.read_file("/tmp/empty") == b""


def test_write_creates_parents(agent: AgentClient):
    agent.write_file("/root/deep/er/still/f.txt", b"x")
    assert agent.stat("/root/deep/er/still")["type"] == "dir"
    assert agent.read_file("/root/deep/er/still/f.txt") == b"x"


def test_mode_on_create_and_overwrite_keeps_mode_and_owner(agent: AgentClient):
    agent.write_file("/tmp/script.sh", b"#!/bin/sh\necho v1\n", mode=0o750)
    assert agent.stat("/tmp/script.sh")["mode"] == 0o750
    assert agent.run(["/tmp/script.sh"]).stdout == "v1\n"
    agent.run(["chown", "1000:1000", "/tmp/script.sh"])
    agent.write_file("/tmp/script.sh", b"#!/bin/sh\necho v2\n")
    st = agent.stat("/tmp/script.sh")
    assert st["mode"] == 0o750 and (st["uid"], st["gid"]) == (1000, 1000)
    assert agent.run(["/tmp/script.sh"]).stdout == "v2\n"
    # an explicit mode wins over the old one
    agent.write_file("/tmp/script.sh", b"x", mode=0o600)
    assert agent.stat("/tmp/script.sh")["mode"] == 0o600


def test_default_mode_and_user_ownership(agent: AgentClient):
    assert agent.write_file("/tmp/plain", b"x")["mode"] == 0o644
    entry = agent.write_file("/home/user/mine.txt", b"x", user="user")
    assert (entry["uid"], entry["gid"], entry["owner"]) == (1000, 1000, "user")
    assert agent.run(["sh", "-c", "echo more >> /home/user/mine.txt"], user="user").exit_code == 0


def test_append(agent: AgentClient):
    agent.write_file("/tmp/log.txt", b"one\n")
    agent.write_file("/tmp/log.txt", b"two\n", append=True)
    agent.write_file("/tmp/log.txt", iter([b"thr", b"ee\n"]), append=True)
    assert agent.read_file("/tmp/log.txt") == b"one\ntwo\nthree\n"
    agent.write_file("/tmp/new-by-append.txt", b"first", append=True)
    assert agent.read_file("/tmp/new-by-append.txt") == b"first"


def test_write_to_a_directory_is_refused(agent: AgentClient):
    agent.mkdir("/tmp/a-dir")
    with pytest.raises(InvalidRequest):
        agent.write_file("/tmp/a-dir", b"x")
    assert agent.stat("/tmp/a-dir")["type"] == "dir"


# --- list, stat, mkdir, move, remove, exists ------------------------------------------------------

def test_list_depth(agent: AgentClient):
    agent.write_file("/root/tree/a/b/c.txt", b"c")
    agent.write_file("/root/tree/x.txt", b"xx")
    one = agent.list_dir("/root/tree")
    assert {e["name"]: e["type"] for e in one} == {"a": "dir", "x.txt": "file"}
    assert {e["path"] for e in one} == {"/root/tree/a", "/root/tree/x.txt"}
    two = {e["path"] for e in agent.list_dir("/root/tree", depth=2)}
    assert two == {"/root/tree/a", "/root/tree/a/b", "/root/tree/x.txt"}
    three = {e["path"] for e in agent.list_dir("/root/tree", depth=3)}
    assert "/root/tree/a/b/c.txt" in three
    with pytest.raises(InvalidRequest):
        agent.list_dir("/root/tree/x.txt")
    with pytest.raises(NotFound):
        agent.list_dir("/root/no-such-dir")


def test_stat_fields(agent: AgentClient):
    agent.write_file("/tmp/st.txt", b"12345", mode=0o640)
    agent.run(["ln", "-sf", "/tmp/st.txt", "/tmp/st.link"])
    f = agent.stat("/tmp/st.txt")
    assert (f["type"], f["size"], f["mode"], f["name"], f["permissions"]) == \
        ("file", 5, 0o640, "st.txt", "-rw-r-----")
    assert (f["owner"], f["group"]) == ("root", "root")
    assert abs(f["modified"] - time.time()) < 300  # the sandbox's clock is the host's
    d = agent.stat("/tmp")
    assert d["type"] == "dir" and d["mode"] == 0o1777
    link = agent.stat("/tmp/st.link")
    assert link["type"] == "symlink" and link["symlink_target"] == "/tmp/st.txt"
    with pytest.raises(NotFound):
        agent.stat("/tmp/nothing-here")


def test_mkdir(agent: AgentClient):
    e = agent.mkdir("/root/m/n/o")
    assert e["type"] == "dir" and e["path"] == "/root/m/n/o"
    assert agent.stat("/root/m/n")["type"] == "dir"
    with pytest.raises(Conflict):
        agent.mkdir("/root/m/n/o")
    agent.write_file("/root/m/file", b"")
    with pytest.raises(Conflict):
        agent.mkdir("/root/m/file")
    with pytest.raises(NotFound):
        agent.mkdir("/root/missing-parent/child", parents=False)
    assert agent.mkdir("/root/m/single", parents=False)["type"] == "dir"
    owned = agent.mkdir("/home/user/p/q", user="user")
    assert owned["uid"] == 1000 and agent.stat("/home/user/p")["uid"] == 1000


def test_move(agent: AgentClient):
    agent.write_file("/root/mv-src.txt", b"moving")
    e = agent.move("/root/mv-src.txt", "/tmp/mv-dst.txt")
    assert e["path"] == "/tmp/mv-dst.txt" and e["size"] == 6
    assert not agent.exists("/root/mv-src.txt")
    assert agent.read_file("/tmp/mv-dst.txt") == b"moving"
    agent.write_file("/root/mvdir/inner.txt", b"i")
    agent.move("/root/mvdir", "/root/mvdir2")
    assert agent.read_file("/root/mvdir2/inner.txt") == b"i"
    with pytest.raises(NotFound):
        agent.move("/root/not-there", "/root/whatever")


def test_remove_and_exists(agent: AgentClient):
    agent.write_file("/root/rm/sub/deeper/f.txt", b"x")
    agent.write_file("/root/rm/top.txt", b"x")
    agent.run(["ln", "-s", "/etc", "/root/rm/link-to-etc"])
    assert agent.exists("/root/rm/top.txt")
    agent.remove("/root/rm/top.txt")
    assert not agent.exists("/root/rm/top.txt")
    agent.remove("/root/rm")  # a whole tree, not following the symlink out of it
    assert not agent.exists("/root/rm")
    assert agent.exists("/etc/passwd")
    with pytest.raises(NotFound):
        agent.remove("/root/rm")
    with pytest.raises(InvalidRequest):
        agent.remove("/")


def test_read_errors(agent: AgentClient):
    with pytest.raises(NotFound):
        agent.read_file("/no/such/file")
    with pytest.raises(InvalidRequest):
        agent.read_file("/etc")
    with pytest.raises(InvalidRequest):
        agent.read_file("")
    with pytest.raises(InvalidRequest):
        agent.read_file("/etc/passwd/child")  # a file used as a directory


# --- path resolution ------------------------------------------------------------------------------

def test_relative_paths_start_at_home(agent: AgentClient):
    agent.write_file("relative.txt", b"rel")
    assert agent.read_file("/root/relative.txt") == b"rel"
    assert agent.stat("relative.txt")["path"] == "/root/relative.txt"
    agent.write_file("users-relative.txt", b"u", user="user")
    assert agent.read_file("/home/user/users-relative.txt") == b"u"


def test_dotdot_stays_in_the_sandbox(engine, agent: AgentClient, sandbox: str):
    assert agent.read_file("/../../../etc/hostname") == f"{sandbox}\n".encode()
    assert agent.read_file("../../../../etc/hostname") == f"{sandbox}\n".encode()
    host_hostname = Path("/etc/hostname").read_bytes() if Path("/etc/hostname").exists() else b""
    assert agent.read_file("/root/../../etc/hostname") != host_hostname or not host_hostname


def test_symlinks_never_reach_the_host(agent: AgentClient, host_marker: Path):
    assert host_marker.exists()
    with pytest.raises(NotFound):
        agent.read_file(str(host_marker))
    agent.run(["ln", "-sf", str(host_marker), "/root/to-host"])
    agent.run(["ln", "-sf", f"/proc/1/root{host_marker}", "/root/via-proc"])
    agent.run(["ln", "-sf", f"/../../..{host_marker}", "/root/via-dotdot"])
    for link in ("/root/to-host", "/root/via-proc", "/root/via-dotdot", f"/proc/1/root{host_marker}",
                 f"/proc/self/root{host_marker}", f"/proc/1/cwd/../../..{host_marker}"):
        with pytest.raises(NotFound):
            agent.read_file(link)
    # /etc/shadow through a link is the sandbox's (minimal has none), never the host's
    agent.run(["ln", "-sf", "/etc/shadow", "/root/shadow"])
    try:
        got = agent.read_file("/root/shadow")
    except NotFound:
        got = None
    assert got != Path("/etc/shadow").read_bytes()


def test_writes_through_symlinks_stay_in_the_sandbox(agent: AgentClient, host_marker: Path):
    target = Path(f"/tmp/shoal-host-new-{secrets.token_hex(6)}")
    original = host_marker.read_bytes()
    try:
        agent.run(["ln", "-sf", str(target), "/root/new-link"])
        agent.run(["ln", "-sf", str(host_marker), "/root/marker-link"])
        agent.write_file("/root/new-link", b"escaped?", append=True)
        agent.write_file("/root/marker-link", b"overwritten?")
        agent.write_file("/root/marker-link", b"appended?", append=True)
        agent.write_file(str(target), b"escaped?")
        assert not target.exists(), "a sandbox write created a file on the host"
        assert host_marker.read_bytes() == original
    finally:
        target.unlink(missing_ok=True)


# --- watch ----------------------------------------------------------------------------------------

class Collector:
    """Reads a watch stream in a thread; the stream ends when the watched directory is removed."""

    def __init__(self, events) -> None:
        self.events: list[dict] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(events,), daemon=True)
        self.thread.start()

    def _run(self, events) -> None:
        try:
            for ev in events:
                self.events.append(ev)
        except BaseException as exc:  # noqa: BLE001
            self.error = exc

    def seen(self, type_: str, name: str) -> bool:
        return any(e.get("type") == type_ and e.get("name") == name for e in self.events)


def test_watch_events(agent: AgentClient):
    agent.mkdir("/root/watched")
    col = Collector(agent.watch("/root/watched"))
    agent.write_file("/root/watched/f.txt", b"1")
    agent.write_file("/root/watched/f.txt", b"2", append=True)
    agent.run(["sh", "-c", "echo 3 >> /root/watched/by-shell.txt"])
    agent.remove("/root/watched/f.txt")
    assert wait_for(lambda: col.seen("remove", "f.txt")), col.events
    agent.remove("/root/watched")  # ends the stream
    col.thread.join(5)
    assert not col.thread.is_alive(), "watch did not end when its directory was removed"
    assert col.error is None, col.error
    f_types = [e["type"] for e in col.events if e["name"] == "f.txt"]
    assert f_types[0] == "create" and "write" in f_types and f_types[-1] == "remove", f_types
    assert f_types.index("write") < f_types.index("remove")
    assert col.seen("create", "by-shell.txt") and col.seen("write", "by-shell.txt")
    assert all(".shoal-" not in e["name"] for e in col.events), "temp files of uploads leaked into events"
    assert all(e["path"].startswith("/root/watched/") for e in col.events)


def test_watch_recursive_follows_new_directories(agent: AgentClient):
    agent.mkdir("/root/rwatch")
    col = Collector(agent.watch("/root/rwatch", recursive=True))
    agent.mkdir("/root/rwatch/sub")
    assert wait_for(lambda: col.seen("create", "sub")), col.events
    agent.write_file("/root/rwatch/sub/inner.txt", b"x")
    assert wait_for(lambda: col.seen("create", "sub/inner.txt")), col.events
    agent.remove("/root/rwatch")
    col.thread.join(5)
    assert not col.thread.is_alive() and col.error is None


def test_watch_errors(agent: AgentClient):
    with pytest.raises(NotFound):
        agent.watch("/root/not-a-dir-at-all")
    agent.write_file("/root/watch-file", b"")
    with pytest.raises(InvalidRequest):
        agent.watch("/root/watch-file")


# --- interrupted uploads ----------------------------------------------------------------------------

def _temp_files(agent: AgentClient, directory: str, name: str) -> list[str]:
    return [e["name"] for e in agent.list_dir(directory) if e["name"].startswith(f".{name}.shoal-")]


def test_interrupted_write_keeps_old_content_and_leaves_no_temp_file(agent: AgentClient):
    agent.write_file("/root/keep.txt", b"the original", mode=0o640)
    conn = agent.connect()
    try:
        conn.send({"op": "file.write", "path": "/root/keep.txt"})
        conn.send_frame(p.DATA, b"N" * (1024 * 1024))
        # the upload is under way: its temp file exists, the target is untouched
        assert wait_for(lambda: _temp_files(agent, "/root", "keep.txt")), "no temp file: test proves nothing"
        assert agent.read_file("/root/keep.txt") == b"the original"
    finally:
        conn.close()  # the client dies before sending the end marker
    assert wait_for(lambda: not _temp_files(agent, "/root", "keep.txt")), \
        f"temp file left behind: {_temp_files(agent, '/root', 'keep.txt')}"
    assert agent.read_file("/root/keep.txt") == b"the original"
    assert agent.stat("/root/keep.txt")["mode"] == 0o640


def test_interrupted_write_of_a_new_file_creates_nothing(agent: AgentClient):
    conn = agent.connect()
    try:
        conn.send({"op": "file.write", "path": "/root/never.txt"})
        conn.send_frame(p.DATA, b"partial")
        assert wait_for(lambda: _temp_files(agent, "/root", "never.txt"))
    finally:
        conn.close()
    assert wait_for(lambda: not _temp_files(agent, "/root", "never.txt"))
    assert not agent.exists("/root/never.txt")


def test_failing_upload_iterator_keeps_old_content(agent: AgentClient):
    agent.write_file("/root/gen.txt", b"old")

    def chunks():
        yield b"new" * 100_000
        raise KeyError("the source broke")

    with pytest.raises(KeyError):
        agent.write_file("/root/gen.txt", chunks())
    assert wait_for(lambda: not _temp_files(agent, "/root", "gen.txt"))
    assert agent.read_file("/root/gen.txt") == b"old"


def test_disk_full(engine, new_sandbox):
    a = engine.agent(new_sandbox(disk_mb=16))
    a.write_file("/root/keep.txt", b"precious")
    with pytest.raises(CapacityExceeded):
        a.write_file("/root/huge.bin", b"x" * (32 * 1024 * 1024))
    with pytest.raises(CapacityExceeded):
        a.write_file("/root/keep.txt", b"y" * (32 * 1024 * 1024))
    assert a.read_file("/root/keep.txt") == b"precious"
    assert [e["name"] for e in a.list_dir("/root")] == ["keep.txt"]  # no half-written file, no temp file
    assert a.write_file("/root/small.txt", b"fits")["size"] == 4


def test_agent_serves_after_garbage(agent: AgentClient):
    conn = agent.connect(timeout=5)
    try:
        conn.send_frame(p.DATA, b"not a request")
        with pytest.raises(InvalidRequest):
            conn.read_msg()
    finally:
        conn.close()
    conn = agent.connect(timeout=5)
    try:
        conn.send({"op": "no.such.op"})
        with pytest.raises(InvalidRequest):
            conn.read_msg()
    finally:
        conn.close()
    assert agent.read_file("/etc/hostname")


# --- odd files and modes ------------------------------------------------------------------------

def test_append_creates_files_like_write_does(agent: AgentClient):
    """An append that creates the file honours ``mode`` and ``user`` exactly as a plain write does."""
    entry = agent.write_file("/tmp/appended-script.sh", b"#!/bin/sh\necho hi\n", mode=0o755, append=True)
    assert entry["mode"] == 0o755
    assert agent.run(["/tmp/appended-script.sh"]).stdout == "hi\n"
    owned = agent.write_file("/home/user/appended.txt", b"x", user="user", append=True)
    assert (owned["uid"], owned["gid"]) == (1000, 1000)


def test_read_of_a_fifo_does_not_hang(engine, new_sandbox):
    """A FIFO (or any file that blocks on open/read) must not hang the caller forever."""
    a = engine.agent(new_sandbox())
    assert a.run(["mkfifo", "/tmp/fifo"]).exit_code == 0
    box: dict = {}

    def read() -> None:
        try:
            box["data"] = a.read_file("/tmp/fifo")
        except Exception as exc:  # noqa: BLE001
            box["error"] = exc

    t = threading.Thread(target=read, daemon=True)
    t.start()
    t.join(3)
    hung = t.is_alive()
    if hung:  # unblock the agent's thread (a writer opens the FIFO) so the sandbox can be destroyed
        a.run(["sh", "-c", "echo > /tmp/fifo"], timeout=2)
        t.join(5)
    assert not hung, "read_file of a FIFO blocks forever"
    # refusing a non-regular file, or reading what is there (nothing: no writer), are both fine
    assert isinstance(box.get("error"), ShoalError) or box.get("data") == b"", box


# --- permissions of the ``user`` option -----------------------------------------------------------

def test_file_operations_as_user_respect_permissions(agent: AgentClient):
    """``user=`` on a file operation means "as that user": root's private files stay private."""
    agent.write_file("/root/private.txt", b"root only", mode=0o600)
    assert agent.run(["cat", "/root/private.txt"], user="user").exit_code != 0  # the kernel says no
    with pytest.raises(Forbidden):
        agent.read_file("/root/private.txt", user="user")
    with pytest.raises(Forbidden):
        agent.write_file("/root/planted-by-user.txt", b"x", user="user")
    assert not agent.exists("/root/planted-by-user.txt")
    with pytest.raises(Forbidden):
        agent.remove("/root/private.txt", user="user")
    assert agent.exists("/root/private.txt")
