"""Processes inside a sandbox: exit codes, output, env, cwd, users, stdin, streaming, background
processes, timeouts, PTYs, errors, binary and large output, concurrency. Real sandboxes."""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time

import pytest

from shoal.errors import Forbidden, InvalidRequest, NotFound
from shoal.runtime.agent_client import AgentClient


def sh(agent: AgentClient, script: str, **kwargs: object):
    return agent.run(["sh", "-c", script], **kwargs)  # type: ignore[arg-type]


def ps_once_gone(agent: AgentClient, pattern: str, wait: float = 3.0) -> str:
    """``ps`` output of the sandbox once no line matches ``pattern`` (or after ``wait`` seconds)."""
    deadline = time.monotonic() + wait
    while True:
        ps = agent.run(["ps", "-o", "pid,args"]).stdout
        if pattern not in ps or time.monotonic() > deadline:
            return ps
        time.sleep(0.05)


def run_guarded(fn, timeout: float = 30.0):
    """Call ``fn()`` in a thread and fail (instead of hanging the suite) if it takes too long."""
    box: dict = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test's thread
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"operation did not finish within {timeout} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


# --- exit status and output ---------------------------------------------------------------------

def test_exit_codes(agent: AgentClient):
    ok = agent.run(["true"])
    assert ok.exit_code == 0 and ok.ok and ok.signal is None and not ok.timed_out
    assert agent.run(["false"]).exit_code == 1
    r = sh(agent, "exit 42")
    assert r.exit_code == 42 and not r.ok and r.signal is None


def test_killed_by_signal(agent: AgentClient):
    r = sh(agent, "kill -TERM $$")
    assert r.signal == 15 and r.exit_code == 128 + 15 and not r.timed_out


def test_stdout_and_stderr_are_separate(agent: AgentClient):
    r = sh(agent, "echo to-out; echo to-err >&2; echo more-out")
    assert r.stdout == "to-out\nmore-out\n"
    assert r.stderr == "to-err\n"
    assert r.pid > 1


def test_env_per_process_and_defaults(agent: AgentClient):
    r = sh(agent, 'printf "%s|%s|%s|%s" "$FOO" "$HOME" "$USER" "$PATH"', env={"FOO": "bar baz=qux"})
    foo, home, user, path = r.stdout.split("|")
    assert foo == "bar baz=qux"
    assert (home, user) == ("/root", "root")
    assert "/usr/bin" in path.split(":")
    # variables of one process never leak into the next
    assert sh(agent, 'printf "%s" "${FOO-unset}"').stdout == "unset"


def test_env_override_and_invalid(agent: AgentClient):
    assert sh(agent, 'printf "%s" "$HOME"', env={"HOME": "/tmp"}).stdout == "/tmp"
    for bad in ({"A=B": "x"}, {"": "x"}, {"NUL": "a\0b"}):
        with pytest.raises(InvalidRequest):
            agent.run(["true"], env=bad)


def test_sandbox_wide_env(engine, new_sandbox):
    sid = new_sandbox(env={"SANDBOX_WIDE": "from-create", "OVERRIDDEN": "create"})
    a = engine.agent(sid)
    r = a.run(["sh", "-c", 'printf "%s %s" "$SANDBOX_WIDE" "$OVERRIDDEN"'], env={"OVERRIDDEN": "process"})
    assert r.stdout == "from-create process"
    # the agent's own configuration variable is not handed to user processes
    assert "SHOAL_ENV" not in a.run(["env"]).stdout


def test_cwd(agent: AgentClient):
    assert agent.run(["pwd"], cwd="/tmp").stdout == "/tmp\n"
    assert agent.run(["pwd"]).stdout == "/root\n"  # root's home by default


def test_user(agent: AgentClient):
    assert agent.run(["id", "-u"], user="user").stdout == "1000\n"
    assert agent.run(["id", "-g"], user="user").stdout == "1000\n"
    assert agent.run(["id", "-u"], user="1000").stdout == "1000\n"
    assert agent.run(["id", "-u"]).stdout == "0\n"
    r = sh(agent, 'printf "%s %s %s" "$HOME" "$USER" "$(pwd)"', user="user")
    assert r.stdout == "/home/user user /home/user"
    # an unprivileged user really is unprivileged: root's files stay closed to it
    denied = agent.run(["sh", "-c", "echo x > /root/by-user"], user="user")
    assert denied.exit_code != 0
    assert not agent.exists("/root/by-user")


def test_unknown_user(agent: AgentClient):
    with pytest.raises(NotFound):
        agent.run(["true"], user="no-such-user")


# --- stdin --------------------------------------------------------------------------------------

def test_stdin_input(agent: AgentClient):
    r = agent.run(["cat"], input=b"hello\nworld\n")
    assert r.stdout_bytes == b"hello\nworld\n"
    assert agent.run(["wc", "-c"], input=b"").stdout.strip() == "0"  # empty input: EOF at once


def test_stdin_streamed_then_closed(agent: AgentClient):
    stream = agent.start(["sh", "-c", "while read line; do echo got:$line; done; echo eof"], stdin=True)
    try:
        stream.send_stdin(b"one\n")
        stream.send_stdin(b"tw")
        stream.send_stdin(b"o\n")
        stream.close_stdin()
        r = run_guarded(stream.wait, 10)
    finally:
        stream.close()
    assert r.stdout == "got:one\ngot:two\neof\n"


def test_large_stdin(agent: AgentClient):
    data = bytes(range(256)) * 8192 * 2  # 4 MiB, every byte value
    r = run_guarded(lambda: agent.run(["sha256sum"], input=data), 30)
    assert r.stdout.split()[0] == hashlib.sha256(data).hexdigest()


def test_stdin_not_read_does_not_block(agent: AgentClient):
    """A process that reads only part of a large input must still finish and report its output."""
    data = b"x" * (8 * 1024 * 1024)
    r = run_guarded(lambda: agent.run(["sh", "-c", "head -c 10 >/dev/null; echo done"], input=data), 20)
    assert r.stdout == "done\n" and r.exit_code == 0


# --- streaming ----------------------------------------------------------------------------------

def test_streaming_callbacks_arrive_before_the_end(agent: AgentClient):
    seen: list[tuple[float, bytes]] = []
    errs: list[bytes] = []
    t0 = time.monotonic()
    r = agent.run(["sh", "-c", "echo first; echo oops >&2; sleep 1; echo second"],
                  on_stdout=lambda b: seen.append((time.monotonic() - t0, b)), on_stderr=errs.append)
    end = time.monotonic() - t0
    assert r.stdout == "first\nsecond\n"
    assert b"".join(b for _, b in seen) == r.stdout_bytes
    assert b"".join(errs) == b"oops\n"
    first_at, first_chunk = seen[0]
    assert first_chunk.startswith(b"first")
    assert first_at < end - 0.5, f"first chunk only at {first_at:.2f}s of {end:.2f}s: output is not streamed"


def test_stream_events(agent: AgentClient):
    stream = agent.start(["sh", "-c", "echo a; echo b >&2; exit 3"])
    kinds = {}
    for ev in stream:
        kinds.setdefault(ev.kind, b"")
        kinds[ev.kind] += ev.data
    stream.close()
    assert kinds["stdout"] == b"a\n" and kinds["stderr"] == b"b\n" and "end" in kinds
    assert stream.result is not None and stream.result.exit_code == 3 and stream.result.pid == stream.pid


# --- background processes -----------------------------------------------------------------------

def test_background_process_lifecycle(agent: AgentClient):
    stream = agent.start(["sh", "-c", 'i=0; while true; do echo "tick $i"; i=$((i+1)); sleep 0.1; done'],
                         tag="ticker")
    pid = stream.pid
    try:
        first = next(ev for ev in stream if ev.kind == "stdout")
        assert first.data.startswith(b"tick 0")
        stream.close()  # stop following; the process must keep running (the ticks read below come after)

        listed = {p["pid"]: p for p in agent.processes()}
        assert pid in listed, "a background process vanished once its starter disconnected"
        assert listed[pid]["tag"] == "ticker" and listed[pid]["cmd"] == "sh"

        follow = agent.connect_process(pid=pid)
        assert follow.pid == pid
        later = b""
        for ev in follow:
            if ev.kind == "stdout":
                later += ev.data
                if later.count(b"\n") >= 2:
                    break
        ticks = [int(n) for n in re.findall(rb"tick (\d+)", later)]
        assert ticks and min(ticks) >= 1, f"connect_process replayed old output: {later!r}"

        by_tag = agent.connect_process(tag="ticker")
        assert by_tag.pid == pid
        by_tag.close()

        agent.signal(pid, 9)
        result = run_guarded(follow.wait, 10)
        assert result.signal == 9 and result.exit_code == 137
        assert pid not in {p["pid"] for p in agent.processes()}
    finally:
        try:
            agent.signal(pid, 9)
        except NotFound:
            pass
    with pytest.raises(NotFound):
        agent.connect_process(pid=pid)
    with pytest.raises(NotFound):
        agent.signal(pid, 9)


def test_signal_through_stream(agent: AgentClient):
    stream = agent.start(["sleep", "100"])
    stream.signal(15)
    r = run_guarded(stream.wait, 10)
    assert r.signal == 15


def test_background_child_holding_stdout_does_not_delay_the_result(agent: AgentClient):
    """``cmd &`` keeps the output pipe open; the result still comes when the command itself exits."""
    t0 = time.monotonic()
    r = run_guarded(lambda: sh(agent, "sleep 106 & echo started"), 10)
    assert r.stdout == "started\n" and r.exit_code == 0
    assert time.monotonic() - t0 < 3
    ps = agent.run(["ps", "-o", "pid,args"]).stdout
    leftover = [line.split()[0] for line in ps.splitlines() if "sleep 106" in line]
    assert leftover, "the background child should keep running after its parent exited"
    agent.run(["kill", "-9", *leftover])


# --- timeouts -----------------------------------------------------------------------------------

def test_timeout_kills_the_whole_tree(agent: AgentClient):
    r = run_guarded(lambda: sh(agent, "sleep 101 & sleep 102 & (sleep 103; echo never) & echo started; wait",
                               timeout=1), 20)  # a 1 s timeout that did not fire within 20 s fails here
    assert r.timed_out and r.signal == 9 and r.exit_code == 137
    assert r.stdout == "started\n"
    ps = ps_once_gone(agent, "sleep 10")
    assert "sleep 10" not in ps, f"children survived the timeout:\n{ps}"


def test_no_timeout_when_fast(agent: AgentClient):
    r = agent.run(["echo", "quick"], timeout=5)
    assert r.exit_code == 0 and not r.timed_out


# --- PTY ----------------------------------------------------------------------------------------

def _read_until(stream, needle: bytes, buf: bytearray, timeout: float = 10.0) -> None:
    def go() -> None:
        for ev in stream:
            buf.extend(ev.data)
            if needle in buf or ev.kind == "end":
                return
    run_guarded(go, timeout)
    assert needle in buf, f"{needle!r} not in PTY output {bytes(buf)!r}"


def test_the_agent_keeps_no_fd_of_a_finished_command(engine, new_sandbox):
    """Each command's stdout and stderr pipes are closed when they reach EOF: they were left open (two fds
    per command since the first agent), so a long-lived sandbox's agent grew thousands of fds, every
    spawn got slower (exec throughput fell from ~500/s to ~190/s over 10,000 commands) and the agent
    would at last stop accepting calls at its fd limit."""

    sid = new_sandbox()
    agent = engine.agent(sid)
    pid = engine.runtime.init_pid(sid)
    assert pid
    agent.run(["true"])
    before = len(os.listdir(f"/proc/{pid}/fd"))

    def some() -> None:
        for _ in range(25):
            agent.run(["sh", "-c", "echo out; echo err >&2"])
    threads = [threading.Thread(target=some) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stream = agent.start(["sh", "-c", "echo pty"], pty=(80, 24))
    run_guarded(lambda: stream.wait(), 10)
    assert len(os.listdir(f"/proc/{pid}/fd")) <= before + 2, os.listdir(f"/proc/{pid}/fd")


def test_a_pty_has_its_size_before_the_command_runs(agent: AgentClient):
    """The size asked for is the terminal's from the first instruction on: it used to be set just after
    the spawn, so a command that looked at once (``stty size`` first thing) could see ``0 0``."""
    sizes = set()
    for i in range(25):
        stream = agent.start(["stty", "size"], pty=(100 + i, 30))
        out = bytearray()
        r = run_guarded(lambda stream=stream, out=out: stream.wait(on_stdout=out.extend), 10)
        assert r.exit_code == 0, bytes(out)
        sizes.add((i, out.decode(errors="replace").strip()))
    assert sizes == {(i, f"30 {100 + i}") for i in range(25)}, sorted(sizes)


def test_pty_and_resize(agent: AgentClient):
    stream = agent.start(["sh", "-c", 'tty; echo "size: $(stty size)"; echo "term: $TERM"; read x; '
                                      'echo "size: $(stty size)"'], pty=(80, 24))
    try:
        out = bytearray()
        _read_until(stream, b"256color", out)
        text = out.decode(errors="replace")
        assert re.search(r"^/dev/pts/\d+\r?$", text, re.M), text
        assert "size: 24 80" in text
        assert "term: xterm-256color" in text
        stream.resize(132, 40)
        stream.send_stdin(b"go\n")
        r = run_guarded(lambda: stream.wait(on_stdout=out.extend), 10)
        assert r.exit_code == 0
        assert "size: 40 132" in out.decode(errors="replace"), bytes(out)
    finally:
        stream.close()


def test_pty_output_kind(agent: AgentClient):
    stream = agent.start(["echo", "hi"], pty=(80, 24))
    kinds = {ev.kind for ev in stream}
    stream.close()
    assert "pty" in kinds and "stdout" not in kinds and "stderr" not in kinds


# --- errors -------------------------------------------------------------------------------------

def test_missing_command(agent: AgentClient):
    with pytest.raises(NotFound):
        agent.run(["/no/such/binary"])
    with pytest.raises(NotFound):
        agent.run(["no-such-command-anywhere"])


def test_bad_cwd(agent: AgentClient):
    with pytest.raises(InvalidRequest):
        agent.run(["pwd"], cwd="/no/such/dir")
    with pytest.raises(InvalidRequest):
        agent.run(["pwd"], cwd="/etc/passwd")  # not a directory


def test_empty_command(agent: AgentClient):
    with pytest.raises(InvalidRequest):
        agent.run([])
    with pytest.raises(InvalidRequest):
        agent.run([""])


def test_not_executable(agent: AgentClient):
    with pytest.raises((InvalidRequest, Forbidden)):
        agent.run(["/etc/passwd"])


def test_agent_survives_errors(agent: AgentClient):
    for _ in range(3):
        with pytest.raises(NotFound):
            agent.run(["no-such-command"])
    assert agent.run(["echo", "alive"]).stdout == "alive\n"


# --- binary, large, concurrent ------------------------------------------------------------------

def test_non_utf8_output_is_byte_exact(agent: AgentClient):
    r = sh(agent, r"printf '\377\376\000\200ok'; printf '\377' >&2")
    assert r.stdout_bytes == b"\xff\xfe\x00\x80ok"
    assert r.stderr_bytes == b"\xff"
    assert r.stdout == "\ufffd\ufffd\x00\ufffdok"  # the text view replaces, the bytes stay exact


def test_large_output_complete(agent: AgentClient):
    size = 20 * 1024 * 1024
    made = sh(agent, f"head -c {size} /dev/urandom > /tmp/big && sha256sum /tmp/big")
    assert made.exit_code == 0, made.stderr
    digest = made.stdout.split()[0]
    r = run_guarded(lambda: agent.run(["cat", "/tmp/big"]), 60)
    assert len(r.stdout_bytes) == size
    assert hashlib.sha256(r.stdout_bytes).hexdigest() == digest
    # both streams at once, interleaved: neither may block the other
    both = run_guarded(lambda: sh(agent, "cat /tmp/big >&2 & cat /tmp/big; wait"), 60)
    assert hashlib.sha256(both.stdout_bytes).hexdigest() == digest
    assert hashlib.sha256(both.stderr_bytes).hexdigest() == digest
    agent.remove("/tmp/big")


def test_many_lines(agent: AgentClient):
    r = sh(agent, "yes | head -c 20000000")
    assert len(r.stdout_bytes) == 20_000_000
    assert r.stdout_bytes == b"y\n" * 10_000_000


#: Each exec checks in, then waits (at most ~15 s) until all of them have: execs run one after
#: another would never all be in at once, and the first would give up with exit code 99.
RENDEZVOUS = ('touch "$D/$N"; i=0; while [ "$(ls "$D" | wc -l)" -lt "$ALL" ]; do i=$((i+1)); '
              '[ $i -gt 300 ] && exit 99; sleep 0.05; done; echo "out $N"; echo "err $N" >&2; exit $N')


def test_concurrent_execs(agent: AgentClient):
    n = 20
    results: dict[int, object] = {}
    errors: list[BaseException] = []
    rendezvous = f"/tmp/concurrent-{time.monotonic_ns()}"
    agent.mkdir(rendezvous)

    def one(i: int) -> None:
        try:
            results[i] = agent.run(["sh", "-c", RENDEZVOUS], env={"N": str(i), "D": rendezvous, "ALL": str(n)})
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "an exec hangs"
    assert not errors, errors
    assert len(results) == n
    for i, r in results.items():
        assert (r.stdout, r.stderr, r.exit_code) == (f"out {i}\n", f"err {i}\n", i)  # type: ignore[attr-defined]
    assert len({r.pid for r in results.values()}) == n  # type: ignore[attr-defined]


# --- descendants that leave the process group -------------------------------------------------

def test_timeout_kills_descendants_that_left_the_process_group(agent: AgentClient):
    """A descendant that starts its own session (``setsid``, any daemon) is still part of the tree."""
    r = run_guarded(lambda: sh(agent, "setsid sleep 104 >/dev/null 2>&1 & sleep 105 & wait", timeout=1), 20)
    assert r.timed_out
    ps = ps_once_gone(agent, "sleep 10")
    for line in ps.splitlines():  # keep the shared sandbox clean for later tests
        if "sleep 10" in line:
            agent.run(["kill", "-9", line.split()[0]])
    assert "sleep 10" not in ps, f"a setsid descendant survived the timeout:\n{ps}"
