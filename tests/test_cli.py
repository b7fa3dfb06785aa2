"""The ``shoal`` CLI end to end, as scripts use it: a subprocess talking to a real daemon on
loopback (``SHOAL_URL``) with real sandboxes. Holds the script contract: ``create`` prints only the
id; ``run``/``exec`` exit with the command's code (124 on timeout, 127 when it cannot be executed);
output is byte-exact; errors are one line and never a traceback."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import select
import signal
import socket
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal import Sandbox
from shoal.errors import NotFound

SHOAL = "/opt/shoal/venv/bin/shoal"
ALL_BYTES = bytes(range(256))
PRINT_ALL_BYTES = "i=0; while [ $i -lt 256 ]; do printf \"\\\\$(printf %03o $i)\"; i=$((i+1)); done"
ID_LINE = re.compile(rb"^[a-z][a-z0-9]{11}\n$")


@pytest.fixture(scope="module")
def env(daemon) -> dict[str, str]:  # noqa: ANN001
    e = {k: v for k, v in os.environ.items() if k not in ("SHOAL_API_KEY", "COLUMNS", "LINES", "SHOAL_DEBUG")}
    e["SHOAL_URL"] = daemon.url  # the key: the daemon's local one (we are root)
    return e


def shoal(env: dict[str, str], *args: str, input: bytes | None = None, timeout: float = 60,
          extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([SHOAL, *args], input=input if input is not None else b"", capture_output=True,
                          env={**env, **(extra_env or {})}, timeout=timeout)


def one_line_error(p: subprocess.CompletedProcess[bytes]) -> str:
    """stderr must be exactly one ``shoal: ...`` line (no traceback)."""
    err = p.stderr.decode()
    assert err.startswith("shoal: ") and err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def sid(env: dict[str, str]) -> Iterator[str]:
    p = shoal(env, "create")
    assert p.returncode == 0, p.stderr
    sandbox_id = p.stdout.decode().strip()
    try:
        yield sandbox_id
    finally:
        shoal(env, "rm", sandbox_id)


def gone(daemon, sandbox_id: str) -> bool:  # noqa: ANN001
    try:
        Sandbox.connect(sandbox_id, url=daemon.url, api_key=daemon.key).close()
        return False
    except NotFound:
        return True


# --- run ---------------------------------------------------------------------------------------------

def test_run_passes_output_and_exit_code_and_cleans_up(env: dict[str, str], daemon):  # noqa: ANN001
    p = shoal(env, "run", "--", "sh", "-c", "hostname; echo to-err >&2; exit 3")
    assert p.returncode == 3, p.stderr
    assert p.stderr == b"to-err\n"
    sandbox_id = p.stdout.decode().strip()
    assert gone(daemon, sandbox_id)  # deleted at the end
    p = shoal(env, "run", "-e", "A=1", "--cwd", "/tmp", "--", "sh", "-c", 'echo "$A $(pwd)"')
    assert (p.returncode, p.stdout) == (0, b"1 /tmp\n")


def test_run_forwards_stdin(env: dict[str, str]):
    p = shoal(env, "run", "--", "cat", input=b"piped\xff\n")
    assert (p.returncode, p.stdout) == (0, b"piped\xff\n")


def test_run_timeout_and_missing_command(env: dict[str, str]):
    t = time.monotonic()
    p = shoal(env, "run", "--timeout", "1", "--", "sleep", "30")
    assert p.returncode == 124 and time.monotonic() - t < 15
    assert "timed out" in one_line_error(p)
    p = shoal(env, "run", "--", "/no/such/command")
    assert p.returncode == 127 and "cannot execute" in one_line_error(p)
    p = shoal(env, "run")
    assert p.returncode == 2 and "missing command" in one_line_error(p)


def test_run_deletes_its_sandbox_on_sigterm(env: dict[str, str], daemon):  # noqa: ANN001
    proc = subprocess.Popen([SHOAL, "run", "--", "sh", "-c", "hostname; sleep 60"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    try:
        sandbox_id = proc.stdout.readline().decode().strip()  # type: ignore[union-attr]
        assert not gone(daemon, sandbox_id)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 130
        assert b"interrupted" in proc.stderr.read()  # type: ignore[union-attr]
    finally:
        proc.kill()
    assert gone(daemon, sandbox_id)


# --- create, exec --------------------------------------------------------------------------------------

def test_create_prints_only_the_id(env: dict[str, str], daemon):  # noqa: ANN001
    p = shoal(env, "create", "--cpu", "0.5", "--memory", "256", "-e", "X=y", "-m", "who=test_cli")
    assert p.returncode == 0 and p.stderr == b""
    assert ID_LINE.match(p.stdout), p.stdout
    sandbox_id = p.stdout.decode().strip()
    try:
        info = Sandbox.connect(sandbox_id, url=daemon.url, api_key=daemon.key).info()
        assert (info.cpu, info.memory_mb, info.metadata) == (0.5, 256, {"who": "test_cli"})
        assert shoal(env, "exec", sandbox_id, "--", "sh", "-c", "echo $X").stdout == b"y\n"
    finally:
        assert shoal(env, "rm", sandbox_id).returncode == 0
    assert gone(daemon, sandbox_id)


def test_exec_exit_codes(env: dict[str, str], sid: str):
    assert shoal(env, "exec", sid, "--", "true").returncode == 0
    assert shoal(env, "exec", sid, "--", "sh", "-c", "exit 42").returncode == 42
    p = shoal(env, "exec", sid, "--", "sh", "-c", "kill -9 $$")
    assert p.returncode == 137
    p = shoal(env, "exec", "--env", "K=v", "--cwd", "/etc", sid, "--", "sh", "-c", 'echo "$K $(pwd)"')
    assert (p.returncode, p.stdout) == (0, b"v /etc\n")


def test_exec_stdin_is_streamed(env: dict[str, str], sid: str):
    data = os.urandom(3 * 1024 * 1024)
    p = shoal(env, "exec", sid, "--", "sha256sum", input=data)
    assert p.returncode == 0 and p.stdout.split()[0].decode() == hashlib.sha256(data).hexdigest()
    p = shoal(env, "exec", sid, "--", "cat", input=ALL_BYTES)
    assert p.stdout == ALL_BYTES
    # a reader that answers before its input ends gets it as it comes (stdin is not read up front)
    proc = subprocess.Popen([SHOAL, "exec", sid, "--", "sh", "-c", "read line; echo got:$line; cat >/dev/null"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        proc.stdin.write(b"first\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        assert proc.stdout.readline() == b"got:first\n"  # type: ignore[union-attr]
        proc.stdin.close()  # type: ignore[union-attr]
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    p = shoal(env, "exec", "--no-interactive", sid, "--", "cat", input=b"ignored")
    assert (p.returncode, p.stdout) == (0, b"")


def test_exec_ends_with_the_command_while_stdin_stays_open(env: dict[str, str], sid: str):
    """`producer | shoal exec ID -- head -1`: the CLI exits when head does, cleanly (no abort at exit
    from the thread still reading stdin)."""
    proc = subprocess.Popen([SHOAL, "exec", sid, "--", "head", "-1"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        proc.stdin.write(b"first\nsecond\n")  # type: ignore[union-attr]
        proc.stdin.flush()  # type: ignore[union-attr]
        assert proc.wait(30) == 0  # stdin is still open
        assert proc.stdout.read() == b"first\n"  # type: ignore[union-attr]
        assert proc.stderr.read() == b""  # type: ignore[union-attr]
    finally:
        proc.kill()


def test_exec_timeout_is_124(env: dict[str, str], sid: str):
    t = time.monotonic()
    p = shoal(env, "exec", "--timeout", "1", sid, "--", "sh", "-c", "echo before; sleep 30")
    assert p.returncode == 124 and time.monotonic() - t < 15
    assert p.stdout == b"before\n"
    assert "timed out after 1 s" in one_line_error(p)


def test_exec_missing_command_is_127(env: dict[str, str], sid: str):
    p = shoal(env, "exec", sid, "--", "/no/such/command", "arg")
    assert p.returncode == 127 and p.stdout == b""
    assert "cannot execute '/no/such/command'" in one_line_error(p)
    p = shoal(env, "exec", sid, "--", "/no/such/command", input=b"with stdin")
    assert p.returncode == 127
    one_line_error(p)


def test_unknown_sandbox_is_one_line(env: dict[str, str]):
    for args in (["exec", "nosuchsandbox", "--", "true"], ["rm", "nosuchsandbox"], ["shell", "nosuchsandbox"],
                 ["cp", "nosuchsandbox:/etc/hostname", "/tmp/"], ["pause", "nosuchsandbox"]):
        p = shoal(env, *args)
        assert p.returncode == 1, args
        assert "nosuchsandbox does not exist" in one_line_error(p)


def test_output_is_byte_exact(env: dict[str, str], sid: str):
    p = shoal(env, "exec", sid, "--", "sh", "-c", f"{PRINT_ALL_BYTES}; {PRINT_ALL_BYTES} >&2")
    assert p.returncode == 0
    assert p.stdout == ALL_BYTES and p.stderr == ALL_BYTES
    p = shoal(env, "exec", sid, "--", "head", "-c", "2000000", "/dev/urandom")
    assert len(p.stdout) == 2_000_000


# --- cp, ls, rm, pause/resume, shell ---------------------------------------------------------------------

def test_cp_files_and_directories_both_ways(env: dict[str, str], sid: str, tmp_path: Path):
    src = tmp_path / "proj"
    (src / "sub" / "deeper").mkdir(parents=True)
    (src / "a.txt").write_text("alpha\n")
    (src / "sub" / "b.bin").write_bytes(ALL_BYTES * 100)
    (src / "sub" / "deeper" / "run.sh").write_text("#!/bin/sh\necho ran\n")
    (src / "sub" / "deeper" / "run.sh").chmod(0o755)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(5 * 1024 * 1024))

    assert shoal(env, "cp", str(src), f"{sid}:/root/").returncode == 0
    assert shoal(env, "exec", sid, "--", "/root/proj/sub/deeper/run.sh").stdout == b"ran\n"
    assert shoal(env, "exec", sid, "--", "cat", "/root/proj/a.txt").stdout == b"alpha\n"
    assert shoal(env, "cp", str(big), f"{sid}:/tmp/big.bin").returncode == 0
    out = shoal(env, "exec", sid, "--", "sha256sum", "/tmp/big.bin").stdout
    assert out.split()[0].decode() == hashlib.sha256(big.read_bytes()).hexdigest()

    back = tmp_path / "back"
    back.mkdir()
    assert shoal(env, "cp", f"{sid}:/root/proj", str(back)).returncode == 0
    assert (back / "proj" / "a.txt").read_text() == "alpha\n"
    assert (back / "proj" / "sub" / "b.bin").read_bytes() == ALL_BYTES * 100
    assert os.stat(back / "proj" / "sub" / "deeper" / "run.sh").st_mode & 0o777 == 0o755
    assert shoal(env, "cp", f"{sid}:/tmp/big.bin", str(tmp_path / "big2.bin")).returncode == 0
    assert (tmp_path / "big2.bin").read_bytes() == big.read_bytes()
    assert shoal(env, "cp", f"{sid}:/etc/hostname", str(back)).returncode == 0
    assert (back / "hostname").read_text().strip() == sid

    p = shoal(env, "cp", f"{sid}:/no/such/file", str(back))
    assert p.returncode == 1
    one_line_error(p)
    p = shoal(env, "cp", str(tmp_path / "missing"), f"{sid}:/tmp/")
    assert p.returncode == 1 and "no such file" in one_line_error(p)
    p = shoal(env, "cp", str(big), str(tmp_path / "x"))
    assert p.returncode == 1 and "ID:/path" in one_line_error(p)


def test_ls_json_and_table(env: dict[str, str], sid: str):
    p = shoal(env, "ls", "--json")
    assert p.returncode == 0, p.stderr
    rows = json.loads(p.stdout)
    mine = [r for r in rows if r["id"] == sid]
    assert len(mine) == 1
    assert mine[0]["state"] == "running" and mine[0]["template"] == "minimal"
    assert {"cpu", "memory_mb", "disk_mb", "created_at", "expires_at", "metadata"} <= set(mine[0])
    p = shoal(env, "ls")
    assert p.returncode == 0 and sid in p.stdout.decode()


def test_pause_resume(env: dict[str, str], sid: str):
    assert shoal(env, "pause", sid).returncode == 0
    rows = json.loads(shoal(env, "ls", "--json", "--state", "paused").stdout)
    assert sid in [r["id"] for r in rows]
    p = shoal(env, "exec", sid, "--", "true")
    assert p.returncode == 1 and "paused" in one_line_error(p)
    assert shoal(env, "resume", sid).returncode == 0
    assert shoal(env, "exec", sid, "--", "true").returncode == 0


def test_rm(env: dict[str, str], daemon):  # noqa: ANN001
    ids = [shoal(env, "create").stdout.decode().strip() for _ in range(2)]
    p = shoal(env, "rm", *ids)
    assert p.returncode == 0 and p.stderr == b""
    assert all(gone(daemon, i) for i in ids)
    p = shoal(env, "rm", ids[0])
    assert p.returncode == 1 and "does not exist" in one_line_error(p)


def test_shell_with_piped_input(env: dict[str, str], sid: str):
    p = shoal(env, "shell", sid, input=b"echo shell-$((40+2)); exit 3\n")
    assert p.returncode == 3, p.stderr
    assert b"shell-42" in p.stdout


def _read_until(fd: int, needle: bytes, timeout: float = 15, settle: float = 0.0) -> bytes:
    """Read the terminal until ``needle``, answering the shell's cursor-position queries like a
    terminal would (busybox ash asks before each prompt and waits for the answer)."""
    buf = b""
    answered = 0
    deadline = time.monotonic() + timeout
    while needle not in buf:
        while buf.count(b"\x1b[6n") > answered:
            os.write(fd, b"\x1b[1;1R")
            answered += 1
        left = deadline - time.monotonic()
        assert left > 0, f"{needle!r} not in {buf[-500:]!r}"
        if select.select([fd], [], [], left)[0]:
            try:
                data = os.read(fd, 65536)
            except OSError:
                break
            if not data:
                break
            buf += data
    end = time.monotonic() + settle  # then keep answering queries for a while
    while time.monotonic() < end:
        while buf.count(b"\x1b[6n") > answered:
            os.write(fd, b"\x1b[1;1R")
            answered += 1
        if select.select([fd], [], [], 0.05)[0]:
            buf += os.read(fd, 65536)
    return buf


def test_shell_on_a_terminal_resizes(env: dict[str, str], sid: str):
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen([SHOAL, "shell", sid], stdin=slave, stdout=slave, stderr=slave, env=env,
                            start_new_session=True)
    os.close(slave)
    try:
        _read_until(master, b"# ", settle=0.5)  # the prompt: the CLI has the terminal in raw mode by now
        os.write(master, b"stty size\n")
        _read_until(master, b"30 100", settle=0.3)
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", 45, 140, 0, 0))
        proc.send_signal(signal.SIGWINCH)
        # the resize reaches the shell asynchronously: ask until it reports the new size
        deadline = time.monotonic() + 30
        while True:
            os.write(master, b"stty size\n")
            try:
                _read_until(master, b"45 140", timeout=1)
                break
            except AssertionError:
                assert time.monotonic() < deadline, "the terminal never saw the resize"
        os.write(master, b"stty size; exit 4\n")
        _read_until(master, b"45 140")
        assert proc.wait(30) == 4
    finally:
        proc.kill()
        os.close(master)


# --- finding the daemon ----------------------------------------------------------------------------------

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_no_daemon_at_a_non_default_url_says_how_to_start_one(env: dict[str, str]):
    port = _closed_port()
    for args in (["ls"], ["create"], ["run", "--", "true"], ["exec", "abc", "--", "true"]):
        p = shoal(env, *args, extra_env={"SHOAL_URL": f"http://127.0.0.1:{port}"})
        assert p.returncode == 1 and p.stdout == b""
        err = one_line_error(p)
        assert f"http://127.0.0.1:{port}" in err and f"shoal serve --port {port}" in err
    with socket.socket() as s:  # and it did not start one there
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_only_the_default_local_url_is_started_automatically(monkeypatch: pytest.MonkeyPatch):
    from shoal.cli.remote import auto_start_allowed
    monkeypatch.delenv("SHOAL_URL", raising=False)
    assert auto_start_allowed("http://127.0.0.1:4040")
    for url, allowed in (("http://127.0.0.1:4040", True), ("http://localhost:4040", True),
                         ("http://127.0.0.1:4041", False), ("http://10.0.0.1:4040", False),
                         ("https://127.0.0.1:4040", False)):
        monkeypatch.setenv("SHOAL_URL", url)
        assert auto_start_allowed(url) is allowed, url


def test_bad_key_is_one_line(env: dict[str, str]):
    p = shoal(env, "ls", extra_env={"SHOAL_API_KEY": "shoal_" + "0" * 40})
    assert p.returncode == 1 and "API key" in one_line_error(p)


# --- exit codes: usage errors, broken pipes, signals -----------------------------------------------------

@pytest.mark.parametrize("args", [["--bogus"], ["exec"], ["run", "--cpu", "lots", "--", "true"], ["no-such-verb"]])
def test_usage_errors_exit_2_without_a_traceback(env: dict[str, str], args: list[str]):
    """Fails if a usage error exits 0 or 1, prints to stdout, or dumps a traceback."""
    p = shoal(env, *args)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert p.stdout == b"" and b"Traceback" not in p.stderr and p.stderr.strip()


def test_usage_errors_are_one_line(env: dict[str, str]):
    one_line_error(shoal(env, "exec"))


def test_run_into_a_closed_pipe_exits_and_cleans_up(env: dict[str, str], daemon):  # noqa: ANN001
    """``shoal run ... | head -1``: fails if the CLI hangs, dumps a traceback or leaves its sandbox."""
    proc = subprocess.Popen([SHOAL, "run", "--", "sh", "-c", "hostname; while true; do echo more; done"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    try:
        sandbox_id = proc.stdout.readline().decode().strip()  # type: ignore[union-attr]
        assert ID_LINE.match(sandbox_id.encode() + b"\n"), sandbox_id
        proc.stdout.close()  # type: ignore[union-attr]  # the reader goes away, as `head -1` does
        code = proc.wait(60)
        err = proc.stderr.read()  # type: ignore[union-attr]
    finally:
        proc.kill()
    assert code != 0 and b"Traceback" not in err, (code, err)
    assert gone(daemon, sandbox_id)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGHUP])
def test_run_deletes_its_sandbox_on_sigint_and_sighup(env: dict[str, str], daemon, sig: int):  # noqa: ANN001
    """Fails if the signal leaves the sandbox running, exits 0, or prints more than one line."""
    proc = subprocess.Popen([SHOAL, "run", "--", "sh", "-c", "hostname; sleep 60"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, env=env)
    try:
        sandbox_id = proc.stdout.readline().decode().strip()  # type: ignore[union-attr]
        assert not gone(daemon, sandbox_id)
        proc.send_signal(sig)
        code = proc.wait(30)
        err = proc.stderr.read().decode()  # type: ignore[union-attr]
    finally:
        proc.kill()
    assert code != 0, err
    assert err.startswith("shoal: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert gone(daemon, sandbox_id)


def test_sigkilled_run_is_reaped_by_the_daemon(env: dict[str, str], daemon):  # noqa: ANN001
    """``kill -9`` leaves the CLI no chance to delete; its sandbox expires (60 s after the last
    keep-alive) and the daemon's reaper deletes it. Fails if it is still there after 150 s."""
    proc = subprocess.Popen([SHOAL, "run", "--", "sh", "-c", "hostname; sleep 600"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL, env=env)
    try:
        sandbox_id = proc.stdout.readline().decode().strip()  # type: ignore[union-attr]
        assert not gone(daemon, sandbox_id)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    deadline = time.monotonic() + 150
    while not gone(daemon, sandbox_id):
        assert time.monotonic() < deadline, f"{sandbox_id} of a SIGKILLed `shoal run` outlived 150 s"
        time.sleep(1)


# --- auto-start and `shoal daemon status/stop` ---------------------------------------------------------

DEFAULT_URL = "http://127.0.0.1:4040"


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_cli_starts_the_default_daemon_and_stops_it(env: dict[str, str]):
    """Only when nothing listens on 4040 (never another's daemon); stops exactly the one it started.
    Fails if the CLI does not start it, `daemon status` lies, or `daemon stop` leaves it running."""
    if _listening(4040):
        pytest.skip("something already listens on 127.0.0.1:4040: not ours to start or stop")
    from shoal.cli.remote import pid_path

    bare = {k: v for k, v in env.items() if k != "SHOAL_URL"}  # the default URL; this run's state dirs
    pid = None
    try:
        p = shoal(bare, "daemon", "status")
        assert p.returncode == 1 and DEFAULT_URL in one_line_error(p)
        p = shoal(bare, "ls")  # nothing answers at the default URL: the CLI starts the daemon
        assert p.returncode == 0, p.stderr
        assert b"started the daemon at " + DEFAULT_URL.encode() in p.stderr, p.stderr
        pid = int(pid_path().read_text())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            assert b"serve" in f.read()
        p = shoal(bare, "daemon", "status")
        assert (p.returncode, p.stdout.decode()) == (0, f"running at {DEFAULT_URL}\n"), p.stderr
        p = shoal(bare, "ls")  # a second CLI finds it running: no second start
        assert p.returncode == 0 and b"started" not in p.stderr
        p = shoal(bare, "daemon", "stop")
        assert p.returncode == 0 and f"pid {pid}".encode() in p.stderr, p.stderr
        assert not os.path.exists(f"/proc/{pid}") and not _listening(4040)
        p = shoal(bare, "daemon", "stop")
        assert p.returncode == 1 and "no daemon" in one_line_error(p)
    finally:
        if pid is not None and os.path.exists(f"/proc/{pid}"):
            os.kill(pid, signal.SIGKILL)  # exactly the daemon this test started
