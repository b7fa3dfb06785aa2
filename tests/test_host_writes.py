"""Host-side writers trust nothing from the sandbox (issue 7).

``shoal cp`` out of a sandbox whose agent sandbox root has taken over (tests/host_writes_fake_agent.py
runs inside the sandbox, steals PID 1's listening socket with pidfd_getfd and answers the host with
lies), and out of a sandbox with the real agent; downloads of files whose size ``stat`` does not
tell (``/proc``, a file growing while it is sent). Real daemon, real sandboxes, the real CLI.
"""

from __future__ import annotations

import hashlib
import os
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from shoal import Sandbox
from shoal.errors import ShoalError
from shoal.runtime.agent_client import AgentClient

SHOAL = "/opt/shoal/venv/bin/shoal"
FAKE_AGENT = Path(__file__).with_name("host_writes_fake_agent.py")
FAKE_CONTENT = b"hostile bytes\n"
SPECIAL_BITS = stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX


@pytest.fixture(scope="module")
def env(daemon) -> dict[str, str]:  # noqa: ANN001
    e = {k: v for k, v in os.environ.items() if k not in ("SHOAL_API_KEY", "SHOAL_DEBUG")}
    e["SHOAL_URL"] = daemon.url
    return e


def shoal(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([SHOAL, *args], stdin=subprocess.DEVNULL, capture_output=True, env=env, timeout=timeout)


def one_line_error(p: subprocess.CompletedProcess[bytes]) -> str:
    assert p.returncode != 0, p
    err = p.stderr.decode()
    assert err.startswith("shoal: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def everything_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _fake_answers(client: AgentClient) -> bool:
    try:
        return client.ping(timeout=2).get("version") == "fake"
    except ShoalError:
        return False


@pytest.fixture(scope="module")
def hostile(daemon, engine) -> Iterator[str]:  # noqa: ANN001
    """A ``base`` sandbox whose host-side agent socket is answered by sandbox root's own program."""
    sb = Sandbox.create(template="base", url=daemon.url, api_key=daemon.key)
    try:
        sb.files.write("/root/fake_agent.py", FAKE_AGENT.read_bytes())
        sb.commands.run("python3 /root/fake_agent.py >/root/fake.log 2>&1", background=True)
        client = AgentClient(str(engine.runtime.agent_socket(sb.id)), sb.id)
        deadline = time.monotonic() + 30
        while not _fake_answers(client):
            assert time.monotonic() < deadline, "the fake agent never took the agent's socket over"
            time.sleep(0.05)
        yield sb.id
    finally:
        sb.kill()
        sb.close()


# --- a taken-over agent ------------------------------------------------------------------------------

@pytest.mark.parametrize("listing", ["dotdot", "absolute", "prefix", "nul", "empty"])
def test_listed_paths_that_leave_the_destination_are_refused(env, hostile: str, tmp_path: Path, listing: str):
    out = tmp_path / "out"
    p = shoal(env, "cp", f"{hostile}:/{listing}", str(out))
    assert "unsafe path from the sandbox" in one_line_error(p)
    written = everything_under(tmp_path)
    assert not [w for w in written if "escaped" in w or w.startswith("etc")], written
    assert written <= {"out", "out/ok.txt"}, written  # only what is legitimately inside, before the lie
    assert not Path("/etc/escaped-absolute").exists()


def test_sandbox_modes_and_owners_never_reach_the_host(env, hostile: str, tmp_path: Path):
    p = shoal(env, "cp", f"{hostile}:/setuid", str(tmp_path / "out"))
    assert p.returncode == 0, p.stderr
    for rel in ("out", "out/bin", "out/bin/tool"):
        s = os.lstat(tmp_path / rel)
        assert s.st_mode & SPECIAL_BITS == 0, (rel, oct(s.st_mode))
        assert (s.st_uid, s.st_gid) == (os.getuid(), os.getgid())
    assert (tmp_path / "out/bin/tool").read_bytes() == FAKE_CONTENT
    # a single file that claims 0o4755
    p = shoal(env, "cp", f"{hostile}:/single-file", str(tmp_path / "one"))
    assert p.returncode == 0, p.stderr
    assert os.lstat(tmp_path / "one").st_mode & SPECIAL_BITS == 0


def test_links_from_the_sandbox_are_skipped_with_a_warning(env, hostile: str, tmp_path: Path):
    p = shoal(env, "cp", f"{hostile}:/symlink", str(tmp_path / "out"))
    assert p.returncode == 0, p.stderr
    assert b"warning: skipped /symlink/passwd: a symlink" in p.stderr
    assert everything_under(tmp_path) == {"out", "out/plain.txt"}


def test_a_link_already_in_the_destination_is_never_followed(env, hostile: str, tmp_path: Path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out/through").mkdir(parents=True)
    (tmp_path / "out/through/planted").symlink_to(elsewhere)
    p = shoal(env, "cp", f"{hostile}:/through", str(tmp_path / "out"))
    assert "planted: is a symlink or not a directory on the host" in one_line_error(p)
    assert list(elsewhere.iterdir()) == []


def test_an_endless_file_stops_at_the_per_file_cap_and_leaves_nothing(env, hostile: str, tmp_path: Path):
    p = shoal(env, "cp", "--max-file-bytes", str(8 << 20), f"{hostile}:/huge", str(tmp_path / "out"))
    assert "larger than the per-file limit of 8388608 bytes" in one_line_error(p)
    assert everything_under(tmp_path) == {"out"}  # no endless.bin, no .shoal-part-* temp file
    p = shoal(env, "cp", "--max-bytes", str(4 << 20), f"{hostile}:/huge", str(tmp_path / "out2"))
    assert "larger than the limit of 4194304 bytes" in one_line_error(p)
    assert everything_under(tmp_path) == {"out", "out2"}


def test_an_interrupted_copy_leaves_no_partial_file(env, hostile: str, tmp_path: Path):
    proc = subprocess.Popen([SHOAL, "cp", f"{hostile}:/huge", str(tmp_path / "out")], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 60
        while not any(f.is_file() and f.stat().st_size for f in tmp_path.rglob("*")):  # bytes are landing
            assert time.monotonic() < deadline and proc.poll() is None, "the copy never started writing"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert everything_under(tmp_path) == {"out"}


def test_an_endless_listing_is_refused_before_anything_is_written(env, hostile: str, tmp_path: Path):
    p = shoal(env, "cp", "--max-entries", "1000", f"{hostile}:/many", str(tmp_path / "out"))
    assert "5000 entries, more than the limit of 1000" in one_line_error(p)
    assert everything_under(tmp_path) == set()


def test_a_malformed_entry_is_the_agents_failure_in_one_clear_error(daemon, hostile: str):  # noqa: ANN001
    r = httpx.get(f"{daemon.url}/v1/sandboxes/{hostile}/files/stat", params={"path": "/malformed"},
                  headers=daemon.headers, timeout=30)
    assert r.json() == {"code": "runtime_failure", "message": "the sandbox agent answered with a malformed file entry"}


# --- the real agent ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real(daemon) -> Iterator[Sandbox]:  # noqa: ANN001
    sb = Sandbox.create(url=daemon.url, api_key=daemon.key)
    try:
        yield sb
    finally:
        sb.kill()
        sb.close()


def test_real_agent_setuid_files_land_without_the_bit(env, real: Sandbox, tmp_path: Path):
    real.files.write("/data/tool", b"#!/bin/sh\necho hi\n", mode=0o4755)
    real.files.write("/data/sub/gtool", b"x", mode=0o2750)
    real.commands.run("chmod 1777 /data/sub")
    assert real.files.stat("/data/tool").mode == 0o4755  # the sandbox really has a setuid file
    p = shoal(env, "cp", f"{real.id}:/data", str(tmp_path))
    assert p.returncode == 0, p.stderr
    for rel in ("data", "data/tool", "data/sub", "data/sub/gtool"):
        assert os.lstat(tmp_path / rel).st_mode & SPECIAL_BITS == 0, rel
    assert os.lstat(tmp_path / "data/tool").st_mode & 0o777 == 0o755 & ~_umask()
    p = shoal(env, "cp", f"{real.id}:/data/tool", str(tmp_path / "tool"))
    assert p.returncode == 0, p.stderr
    assert os.lstat(tmp_path / "tool").st_mode & SPECIAL_BITS == 0
    assert (tmp_path / "tool").read_bytes() == b"#!/bin/sh\necho hi\n"


def test_real_agent_symlink_to_etc_passwd_neither_writes_nor_reads_the_host(env, real: Sandbox, tmp_path: Path):
    host_passwd = hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest()
    real.files.write("/links/plain", b"plain\n")
    real.commands.run("ln -s /etc/passwd /links/passwd && ln -s / /links/root")
    p = shoal(env, "cp", f"{real.id}:/links", str(tmp_path))
    assert p.returncode == 0, p.stderr
    assert everything_under(tmp_path) == {"links", "links/plain"}
    assert b"skipped /links/passwd: a symlink" in p.stderr and b"skipped /links/root: a symlink" in p.stderr
    # naming the link itself reads it inside the sandbox: the sandbox's passwd, never the host's
    p = shoal(env, "cp", f"{real.id}:/links/passwd", str(tmp_path / "passwd"))
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "passwd").read_bytes() == real.files.read("/etc/passwd", format="bytes")
    assert hashlib.sha256(Path("/etc/passwd").read_bytes()).hexdigest() == host_passwd


def _umask() -> int:
    old = os.umask(0o022)
    os.umask(old)
    return old


# --- downloads whose size stat does not tell (item 15) ----------------------------------------------------

def test_proc_files_download_with_their_contents(daemon, real: Sandbox):  # noqa: ANN001
    assert real.files.stat("/proc/version").size == 0
    r = httpx.get(f"{daemon.url}/v1/sandboxes/{real.id}/files", params={"path": "/proc/version"},
                  headers=daemon.headers, timeout=30)
    assert r.status_code == 200 and r.content.startswith(b"Linux version"), r.content[:200]
    assert "Name:" in real.files.read("/proc/self/status")


def test_a_file_growing_during_the_download_is_sent_as_it_was_at_open(daemon, real: Sandbox):  # noqa: ANN001
    size = (64 << 20) + 100  # more than every buffer between the agent and us; not chunk-aligned
    real.commands.run(f"head -c {size} /dev/zero > /tmp/grow")
    url = f"{daemon.url}/v1/sandboxes/{real.id}/files"
    with httpx.stream("GET", url, params={"path": "/tmp/grow"}, headers=daemon.headers, timeout=60) as r:
        assert r.status_code == 200 and int(r.headers["content-length"]) == size
        chunks = r.iter_bytes()
        got = bytearray(next(chunks))
        assert len(got) < size  # the agent is held back by flow control, far from the end of the file
        real.files.write("/tmp/grow", b"appended while the download was under way\n" * 25_000, append=True)
        for chunk in chunks:
            got += chunk
    assert len(got) == size and got.count(0) == size
    real.files.remove("/tmp/grow")


def test_the_agent_sends_no_more_than_the_size_at_open(engine, real: Sandbox):  # noqa: ANN001
    agent = engine.agent(real.id)
    size = (32 << 20) + 7
    real.commands.run(f"head -c {size} /dev/zero > /tmp/grow-agent")
    chunks = agent.read_file_stream("/tmp/grow-agent")
    got = bytearray(next(chunks))
    agent.write_file("/tmp/grow-agent", b"x" * (3 << 20), append=True)
    for chunk in chunks:
        got += chunk
    assert len(got) == size
    agent.remove("/tmp/grow-agent")
