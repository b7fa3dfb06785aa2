"""No sandbox takes more than its share: host disk, kernel per-user budgets, memory (OOM victims).

Each budget test has one sandbox exhaust the budget and then checks that another sandbox and the
host (root, like the daemon) can still take some: before per-sandbox shares, the first sandbox
took the whole of root's host budget."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shoal.runtime.agent_client import AgentClient

MiB = 1024 * 1024


def _hold(agent: AgentClient, code: str, name: str) -> int:
    """Run ``code`` (python3) in the background in the sandbox; it prints a count and holds what it
    took until the sandbox goes. Return the count."""
    agent.write_file(f"/tmp/{name}.py", code.encode())
    agent.run(["sh", "-c", f"nohup python3 /tmp/{name}.py > /tmp/{name}.out 2>&1 &"])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        out = agent.read_file(f"/tmp/{name}.out").decode()
        if out.strip().splitlines() and out.strip().splitlines()[-1].startswith("taken "):
            return int(out.split("taken ")[1].split()[0])
        time.sleep(0.1)
    raise AssertionError(f"{name} never finished: {agent.read_file(f'/tmp/{name}.out')!r}")


def _probe_sandbox(agent: AgentClient, code: str) -> str:
    r = agent.run(["python3", "-c", code], timeout=60)
    return r.stdout.strip() + r.stderr.strip()[-300:]


def _probe_host(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return r.stdout.strip() + r.stderr.strip()[-300:]


# --- inotify instances: every uid of the sandbox together, not each ----------------------------

INOTIFY_EXHAUST = """
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
def take(limit=100000):
    fds = []
    while len(fds) < limit:
        fd = libc.inotify_init1(0)
        if fd < 0:
            break
        fds.append(fd)
    return fds
total = 0
for uid in (0, 1000, 1001, 1002):  # a per-uid limit would give each uid its own share
    r, w = os.pipe()
    if os.fork() == 0:
        os.setgid(uid); os.setuid(uid)
        os.write(w, str(len(take())).encode() + b"\\n")
        time.sleep(3600)
    total += int(os.read(r, 32))
print("taken", total, flush=True)
time.sleep(3600)
"""
INOTIFY_PROBE = """
import ctypes
libc = ctypes.CDLL(None, use_errno=True)
fds = [libc.inotify_init1(0) for _ in range(8)]
print("ok" if all(fd >= 0 for fd in fds) else f"refused after {sum(fd >= 0 for fd in fds)}")
"""


def test_inotify_instances_are_shared_per_sandbox(engine, new_sandbox, base_template):
    hog, other = engine.agent(new_sandbox(base_template)), engine.agent(new_sandbox(base_template))
    taken = _hold(hog, INOTIFY_EXHAUST, "inotify")
    assert 0 < taken <= 128, taken
    assert _probe_sandbox(other, INOTIFY_PROBE) == "ok"
    assert _probe_host(INOTIFY_PROBE) == "ok"


WATCH_EXHAUST = """
import ctypes, os, time
libc = ctypes.CDLL(None, use_errno=True)
os.makedirs("/tmp/w", exist_ok=True)
fd = libc.inotify_init1(0)
n = 0
while n < 1000000:
    p = f"/tmp/w/{n}"
    open(p, "w").close()
    if libc.inotify_add_watch(fd, p.encode(), 0x100) < 0:
        break
    n += 1
print("taken", n, flush=True)
time.sleep(3600)
"""
WATCH_PROBE = """
import ctypes, os, tempfile
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(0)
d = tempfile.mkdtemp()
ok = all(libc.inotify_add_watch(fd, d.encode(), 0x100 | (i << 1)) >= 0 for i in range(1))
files = [os.path.join(d, str(i)) for i in range(16)]
for p in files:
    open(p, "w").close()
print("ok" if ok and all(libc.inotify_add_watch(fd, p.encode(), 0x100) >= 0 for p in files) else "refused")
"""


def test_inotify_watches_are_shared_per_sandbox(engine, new_sandbox, base_template):
    hog = engine.agent(new_sandbox(base_template, memory_mb=1024, disk_mb=256))
    other = engine.agent(new_sandbox(base_template))
    taken = _hold(hog, WATCH_EXHAUST, "watches")
    assert taken > 0
    assert _probe_sandbox(other, WATCH_PROBE) == "ok"
    assert _probe_host(WATCH_PROBE) == "ok"


# --- rlimit-based counters: pending signals, POSIX message queues ------------------------------

SIGNAL_EXHAUST = """
import ctypes, signal, time
libc = ctypes.CDLL(None, use_errno=True)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGRTMIN})
n = 0
while n < 200000 and libc.sigqueue(libc.getpid(), int(signal.SIGRTMIN), ctypes.c_void_p(0)) == 0:
    n += 1
print("taken", n, flush=True)
time.sleep(3600)
"""
SIGNAL_PROBE = """
import ctypes, signal
libc = ctypes.CDLL(None, use_errno=True)
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGRTMIN})
ok = all(libc.sigqueue(libc.getpid(), int(signal.SIGRTMIN), ctypes.c_void_p(0)) == 0 for _ in range(8))
print("ok" if ok else "refused: " + str(ctypes.get_errno()))
"""


def test_pending_signals_are_shared_per_sandbox(engine, new_sandbox, base_template):
    hog, other = engine.agent(new_sandbox(base_template)), engine.agent(new_sandbox(base_template))
    taken = _hold(hog, SIGNAL_EXHAUST, "signals")
    assert taken > 0
    assert _probe_sandbox(other, SIGNAL_PROBE) == "ok"
    assert _probe_host(SIGNAL_PROBE) == "ok"


MQUEUE_EXHAUST = """
import ctypes, os, time
rt = ctypes.CDLL("librt.so.1", use_errno=True)
class Attr(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_long), ("maxmsg", ctypes.c_long), ("msgsize", ctypes.c_long),
                ("curmsgs", ctypes.c_long), ("pad", ctypes.c_long * 4)]
rt.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(Attr)]
total, n = 0, 0
while n < 256:
    a = Attr(0, 10, 8192, 0)
    if rt.mq_open(f"/q{n}".encode(), os.O_CREAT | os.O_RDWR, 0o600, ctypes.byref(a)) < 0:
        break
    n += 1
print("taken", n, flush=True)
time.sleep(3600)
"""
MQUEUE_PROBE = """
import ctypes, os, secrets
rt = ctypes.CDLL("librt.so.1", use_errno=True)
class Attr(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_long), ("maxmsg", ctypes.c_long), ("msgsize", ctypes.c_long),
                ("curmsgs", ctypes.c_long), ("pad", ctypes.c_long * 4)]
rt.mq_open.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_int, ctypes.POINTER(Attr)]
name = f"/shoal-probe-{secrets.token_hex(4)}".encode()
fd = rt.mq_open(name, os.O_CREAT | os.O_RDWR, 0o600, ctypes.byref(Attr(0, 10, 8192, 0)))
print("ok" if fd >= 0 else "refused: " + os.strerror(ctypes.get_errno()))
if fd >= 0:
    rt.mq_unlink(name)
"""


def test_message_queue_bytes_are_shared_per_sandbox(engine, new_sandbox, base_template):
    hog, other = engine.agent(new_sandbox(base_template)), engine.agent(new_sandbox(base_template))
    taken = _hold(hog, MQUEUE_EXHAUST, "mqueue")
    assert 0 < taken < 256, taken  # stopped by its byte budget, not the namespace's queue count
    assert _probe_sandbox(other, MQUEUE_PROBE) == "ok"
    assert _probe_host(MQUEUE_PROBE) == "ok"


# --- host disk: PID 1's output ----------------------------------------------------------------

def _bundle_bytes_on_host_disk(bundle: Path) -> int:
    """Bytes of regular files under ``bundle`` that live on the bundle's own (host) filesystem."""
    dev = bundle.stat().st_dev
    total = 0
    for root, dirs, files in os.walk(bundle):
        dirs[:] = [d for d in dirs if (Path(root) / d).lstat().st_dev == dev]
        for f in files:
            st = (Path(root) / f).lstat()
            if st.st_dev == dev:
                total += st.st_blocks * 512
    return total


#: Sandbox root takes PID 1's stderr (pidfd_getfd: same uid, no capability needed) and fills it.
STEAL_AGENT_STDERR = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
pidfd = libc.syscall(434, 1, 0)                 # pidfd_open(1)
fd = libc.syscall(438, pidfd, 2, 0)             # pidfd_getfd(pidfd, 2)
assert fd >= 0, os.strerror(ctypes.get_errno())
block, written = b"x" * (1 << 20), 0
try:
    while written < 64 << 20:
        written += os.write(fd, block)
    print("wrote", written)
except OSError as exc:
    print("stopped after", written, exc)
"""


def test_agent_output_counts_against_the_disk_limit(engine, new_sandbox, base_template):
    sid = new_sandbox(base_template, disk_mb=16)
    a = engine.agent(sid)
    r = a.run(["python3", "-c", STEAL_AGENT_STDERR], timeout=60)
    assert "No space left" in r.stdout + r.stderr, (r.exit_code, r.stdout, r.stderr)
    try:  # the same through the files API, no code needed
        a.write_file("/proc/self/fd/1", (b"y" * MiB for _ in range(32)), append=True)
    except Exception:  # noqa: BLE001 - refusing is the point; how is the files API's business
        pass
    assert _bundle_bytes_on_host_disk(engine.runtime.bundle(sid)) < MiB
    assert a.run(["echo", "alive"]).stdout == "alive\n"


# --- memory: user processes are the OOM victims, never the agent ---------------------------------

def test_oom_kills_user_processes_not_the_agent(engine, new_sandbox, base_template):
    """Small processes and a RAM-backed writable layer fill a 64 MiB sandbox: the agent is the
    biggest process there, yet the kernel must pick the user's."""
    sid = new_sandbox(base_template, memory_mb=64, layer="ram")  # the disk layer would just take it
    a = engine.agent(sid)
    a.run(["sh", "-c", "for i in $(seq 20); do nohup sleep 600 >/dev/null 2>&1 & done"])
    # dd itself is the writer (no shell whose death would leave a writer behind to refill memory)
    r = a.run(["dd", "if=/dev/zero", "of=/tmp/fill", "bs=1M", "count=200"], timeout=60)
    assert r.exit_code != 0, "the writable layer took 200 MiB in a 64 MiB sandbox: test proves nothing"
    assert (engine.runtime.usage(sid).get("oom_kills") or 0) > 0, "no OOM kill happened: test proves nothing"
    assert engine.runtime.is_alive(sid), "the OOM killer took the agent"
    a.remove("/tmp/fill")  # by the agent itself: a new process could be the next OOM victim until then
    # the agent gives each child its score right after the spawn (see agent/spawn.py): read it from a
    # process the child forks a moment later, which inherits it
    r = a.run(["sh", "-c", "sleep 0.2; cat /proc/self/oom_score_adj"])
    assert r.stdout == "1000\n", (r, engine.runtime.usage(sid))
    assert a.run(["echo", "alive"]).stdout == "alive\n"


@pytest.mark.parametrize("user", ["root", "user"])
def test_children_cannot_outrank_the_agent(engine, base_sandbox, user):
    """A process may raise its own OOM score, never lower it below the agent's."""
    a = engine.agent(base_sandbox)
    r = a.run(["sh", "-c", "sleep 0.2; cat /proc/self/oom_score_adj; echo -1000 > /proc/self/oom_score_adj"],
              user=user)  # (the agent gives the child its score right after the spawn)
    assert r.stdout == "1000\n" and r.exit_code != 0, (r.stdout, r.stderr)
    agent_score = int(a.read_file("/proc/1/oom_score_adj"))
    r = a.run(["sh", "-c", f"sleep 0.2; echo {agent_score} > /proc/self/oom_score_adj; cat /proc/self/oom_score_adj"],
              user=user)  # after the agent's own write of the child's score, or the agent's would win the race
    assert agent_score < 0 or r.stdout == f"{agent_score}\n"  # equal at best: lower is refused above
