"""Escape attempts from inside a sandbox, as sandbox root. Every one must fail, and the host (and
other sandboxes) must be unchanged afterwards. Real sandboxes, real kernel."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from shoal.errors import NotFound, ShoalError
from shoal.runtime.agent_client import AgentClient
from shoal.settings import Settings

PREFIX = Settings().resource_prefix  # this run's instance: shoal-<instance>-<sandbox>

CGROUP = Path("/sys/fs/cgroup")


def sh(agent: AgentClient, script: str, **kwargs: object):
    return agent.run(["sh", "-c", script], **kwargs)  # type: ignore[arg-type]


def cgroup_file(controller: str, sandbox_id: str, name: str) -> Path:
    """A sandbox's cgroup file on the host, v1 (``<controller>/shoal-<id>``) or v2 (``shoal-<id>``)."""
    v1 = CGROUP / controller / f"{PREFIX}{sandbox_id}" / name
    return v1 if v1.parent.is_dir() else CGROUP / f"{PREFIX}{sandbox_id}" / name


def py_syscall(agent: AgentClient, nr: int, *args: int) -> str:
    """Run syscall ``nr`` in the sandbox (base template) and return the errno name it failed with."""
    code = ("import ctypes, errno, os\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            f"r = libc.syscall({nr}, {', '.join(str(a) for a in args) or '0'})\n"
            "if r == 0 and os.getpid() != PARENT: os._exit(0)\n"
            "print('OK' if r >= 0 else errno.errorcode[ctypes.get_errno()])\n")
    res = agent.run(["python3", "-c", "import os; PARENT = os.getpid()\n" + code])
    assert res.exit_code == 0, res.stderr
    return res.stdout.strip()


# --- what a sandbox can see ---------------------------------------------------------------------

def test_host_processes_are_invisible(agent: AgentClient):
    pids = [int(n) for n in agent.run(["ls", "/proc"]).stdout.split() if n.isdigit()]
    assert 1 in pids and len(pids) < 10, f"the sandbox sees {len(pids)} processes: {pids}"
    ps = agent.run(["ps", "-o", "pid,args"]).stdout
    assert "pytest" not in ps and "crun" not in ps
    cmdline = agent.read_file("/proc/1/cmdline")
    assert b"shoal.agent" in cmdline, "pid 1 of the sandbox is not its own agent"
    me = os.getpid()
    if me not in pids:  # (a tiny host pid may exist in the sandbox too, as a different process)
        assert agent.run(["kill", "-0", str(me)]).exit_code != 0
        assert not agent.exists(f"/proc/{me}")


def test_host_files_are_invisible(agent: AgentClient, host_marker: Path):
    r = agent.run(["cat", str(host_marker)])
    assert r.exit_code != 0 and host_marker.read_text() not in r.stdout
    found = sh(agent, f"find / \\( -path /proc -o -path /sys \\) -prune -o -name '{host_marker.name}' -print")
    assert found.stdout == ""
    assert not agent.exists("/run/shoal") and not agent.exists("/var/lib/shoal")


def test_agent_socket_and_bundle_are_invisible(agent: AgentClient, sandbox: str):
    found = sh(agent, "find / \\( -path /proc -o -path /sys \\) -prune -o -name 'agent.sock' -print")
    assert found.stdout == ""
    assert sh(agent, f"find / \\( -path /proc -o -path /sys \\) -prune -o -name 'config.json' -print "
                     f"| grep -c {sandbox}").stdout.strip() == "0"


def test_network_interfaces(engine, new_sandbox):
    """A sandbox without a network has loopback only; with one, loopback and its own single interface.
    (What the interface can reach is held by tests/test_net_isolation.py, against test hosts only.)"""
    def interfaces(sid: str) -> list[str]:
        lines = engine.agent(sid).read_file("/proc/net/dev").decode().splitlines()[2:]
        return sorted(line.split(":")[0].strip() for line in lines)
    assert interfaces(new_sandbox(network=False)) == ["lo"]
    names = interfaces(new_sandbox())
    assert len(names) == 2 and "lo" in names, names


def test_uid_map_root_is_not_host_root(engine, sandbox: str):
    # Read from the host: inside, the map is shown relative to the sandbox's outer user namespace
    # (shoal.runtime.linux.budgets), which is the one that maps to host uids.
    pid = engine.runtime.init_pid(sandbox)
    assert Path(f"/proc/{pid}/uid_map").read_text().split() == ["0", "100000", "65536"]
    assert Path(f"/proc/{pid}/gid_map").read_text().split() == ["0", "100000", "65536"]


def test_files_created_inside_belong_to_the_mapped_range(engine, agent: AgentClient, sandbox: str):
    agent.run(["touch", "/root/made-by-root"])
    agent.run(["touch", "/home/user/made-by-user"], user="user")
    upper = engine.runtime.bundle(sandbox) / "upper" / "upper"
    st = (upper / "root" / "made-by-root").stat()
    assert (st.st_uid, st.st_gid) == (100000, 100000)
    st = (upper / "home" / "user" / "made-by-user").stat()
    assert (st.st_uid, st.st_gid) == (101000, 101000)


def test_capabilities_seccomp_and_no_new_privs(agent: AgentClient):
    status = dict(line.split(":\t", 1) for line in agent.read_file("/proc/self/status").decode().splitlines()
                  if ":\t" in line)
    assert status["NoNewPrivs"].strip() == "0"  # setuid (sudo) works; test_security_escape shows it gains nothing
    assert status["Seccomp"].strip() == "2"
    eff = int(status["CapEff"], 16)
    forbidden = {"DAC_READ_SEARCH": 2, "NET_ADMIN": 12, "NET_RAW": 13, "SYS_MODULE": 16, "SYS_RAWIO": 17,
                 "SYS_PTRACE": 19, "SYS_ADMIN": 21, "SYS_BOOT": 22, "SYS_RESOURCE": 24, "SYS_TIME": 25,
                 "MKNOD": 27, "BPF": 39}
    held = [name for name, bit in forbidden.items() if eff & (1 << bit)]
    assert not held, f"sandbox root holds {held}"


# --- what a sandbox cannot do -------------------------------------------------------------------

def test_mount_fails(agent: AgentClient):
    before = agent.read_file("/proc/self/mountinfo")
    assert sh(agent, "mount -t tmpfs none /mnt").exit_code != 0
    assert sh(agent, "mount --bind / /mnt").exit_code != 0
    assert sh(agent, "mount -t proc proc /mnt").exit_code != 0
    assert sh(agent, "mount -o remount,rw /.shoal").exit_code != 0
    assert agent.read_file("/proc/self/mountinfo") == before


def test_unshare_fails(agent: AgentClient):
    for flag in ("-U", "-m", "-n", "-p -f", "-u", "-i", "-r"):
        r = sh(agent, f"unshare {flag} true")
        assert r.exit_code != 0, f"unshare {flag} succeeded"
    assert "Operation not permitted" in sh(agent, "unshare -U true").stderr


def test_sethostname_does_not_reach_the_host(agent: AgentClient, sandbox: str):
    host = socket.gethostname()
    sh(agent, "hostname evil-hostname")
    assert socket.gethostname() == host
    assert Path("/proc/sys/kernel/hostname").read_text().strip() == host
    assert agent.run(["hostname"]).stdout.strip() in (sandbox, "evil-hostname")


def test_agent_runtime_is_read_only(agent: AgentClient, engine):
    r = sh(agent, "touch /.shoal/planted || echo x >> /.shoal/READY")
    assert r.exit_code != 0
    assert not (engine.settings.agent_runtime_dir / "planted").exists()
    assert sh(agent, "ls /.shoal").exit_code == 0


def test_cannot_load_kernel_modules(agent: AgentClient, base_agent: AgentClient):
    assert sh(agent, "insmod /tmp/nothing.ko").exit_code != 0
    assert sh(agent, "modprobe dummy").exit_code != 0
    if Path("/proc/sys/kernel/modprobe").exists():
        before = Path("/proc/sys/kernel/modprobe").read_text()
        assert sh(agent, "echo /tmp/evil > /proc/sys/kernel/modprobe").exit_code != 0
        assert Path("/proc/sys/kernel/modprobe").read_text() == before
    # refused by seccomp before the kernel even looks at the arguments (EPERM, not EBADF/ENOSYS)
    assert py_syscall(base_agent, 313, -1, 0, 0) == "EPERM"   # finit_module
    assert py_syscall(base_agent, 175, 0, 0, 0) == "EPERM"    # init_module


def test_proc_sys_is_read_only(agent: AgentClient):
    pattern = Path("/proc/sys/kernel/core_pattern").read_text()
    r = sh(agent, "echo '|/tmp/evil %p' > /proc/sys/kernel/core_pattern")
    assert r.exit_code != 0 and "Read-only" in r.stderr
    assert Path("/proc/sys/kernel/core_pattern").read_text() == pattern  # the classic escape
    assert sh(agent, "echo 3 > /proc/sys/vm/drop_caches").exit_code != 0
    assert sh(agent, "echo b > /proc/sysrq-trigger").exit_code != 0


def test_sensitive_proc_files_are_masked(agent: AgentClient):
    mountinfo = agent.read_file("/proc/self/mountinfo").decode()
    points = {line.split()[4] for line in mountinfo.splitlines()}
    for path in ("/proc/keys", "/proc/kallsyms", "/proc/timer_list", "/proc/kcore", "/proc/sched_debug"):
        if not Path(path).exists():
            continue  # this host's kernel has no such file; nothing to hide
        assert path in points, f"{path} is not masked"
        assert agent.run(["sh", "-c", f"cat {path} | wc -c"]).stdout.strip() == "0", path
    assert "/proc/keys" in points  # always present on Linux: the masking itself is exercised


def test_cgroup_limits_cannot_be_raised(engine, agent: AgentClient, sandbox: str):
    limit_file = cgroup_file("memory", sandbox, "memory.limit_in_bytes")
    if not limit_file.exists():
        limit_file = cgroup_file("memory", sandbox, "memory.max")
    before = limit_file.read_text()
    assert int(before) == engine.get(sandbox).memory_mb * 1024 * 1024
    inner = "/sys/fs/cgroup/memory/memory.limit_in_bytes"
    if not agent.exists(inner):
        inner = "/sys/fs/cgroup/memory.max"
    r = sh(agent, f"echo 999999999999 > {inner}")
    assert r.exit_code != 0
    pids_max = "/sys/fs/cgroup/pids/pids.max" if agent.exists("/sys/fs/cgroup/pids") else "/sys/fs/cgroup/pids.max"
    assert sh(agent, f"echo 999999 > {pids_max}").exit_code != 0
    assert limit_file.read_text() == before
    memory_dir = "/sys/fs/cgroup/memory" if agent.exists("/sys/fs/cgroup/memory") else "/sys/fs/cgroup"
    assert sh(agent, f"mkdir {memory_dir}/child").exit_code != 0


def test_devices_and_clock(agent: AgentClient):
    assert sh(agent, "mknod /tmp/disk b 8 0").exit_code != 0
    sh(agent, "date -s '2001-01-01 00:00:00'")  # busybox date exits 0 even when it could not set it
    assert abs(time.time() - float(agent.run(["date", "+%s"]).stdout)) < 60
    devs = set(agent.run(["ls", "/dev"]).stdout.split())
    assert not devs & {"mem", "kmem", "port", "sda", "vda", "kmsg", "loop0", "loop-control", "fuse"}


def test_seccomp_blocks_namespaces_and_keyrings(base_agent: AgentClient):
    assert py_syscall(base_agent, 272, 0x10000000) == "EPERM"                     # unshare(CLONE_NEWUSER)
    assert py_syscall(base_agent, 56, 0x10000000 | 17, 0, 0, 0, 0) == "EPERM"     # clone(CLONE_NEWUSER)
    assert py_syscall(base_agent, 435, 0, 0) == "ENOSYS"                          # clone3: libc falls back
    assert py_syscall(base_agent, 250, 0, -1, 0) == "EPERM"                        # keyctl
    assert py_syscall(base_agent, 248, 0, 0, 0, 0, 0) == "EPERM"                   # add_key
    assert py_syscall(base_agent, 321, 0, 0, 0) == "EPERM"                         # bpf
    assert py_syscall(base_agent, 298, 0, 0, 0, 0, 0) == "EPERM"                   # perf_event_open
    assert py_syscall(base_agent, 425, 1, 0) == "EPERM"                            # io_uring_setup
    assert py_syscall(base_agent, 304, 0, 0, 0) == "EPERM"                         # open_by_handle_at
    assert py_syscall(base_agent, 308, 0, 0) == "EPERM"                            # setns
    r = base_agent.run(["unshare", "-U", "true"])
    assert r.exit_code != 0 and "Operation not permitted" in r.stderr


# --- other sandboxes ------------------------------------------------------------------------------

def test_cannot_reach_another_sandbox(engine, new_sandbox):
    a, b = engine.agent(new_sandbox()), engine.agent(other := new_sandbox())
    secret = f"secret-{secrets.token_hex(6)}"
    b.write_file(f"/root/{secret}", b"for b only")
    sleeper = b.start(["sleep", "7777"])
    try:
        found = sh(a, f"find / \\( -path /proc -o -path /sys \\) -prune -o -name '{secret}' -print")
        assert found.exit_code == 0 and found.stdout == ""
        assert "7777" not in a.run(["ps", "-o", "args"]).stdout
        for path in (f"/run/shoal/sandboxes/{other}/rootfs/root/{secret}", f"/proc/1/root/root/{secret}"):
            with pytest.raises(NotFound):
                a.read_file(path)
        # the template's files are shared read-only: changing them in one sandbox changes nothing in another
        passwd = b.read_file("/etc/passwd")
        r = sh(a, "echo 'evil:x:0:0::/:/bin/sh' >> /etc/passwd && rm /bin/true /bin/ls && echo tampered > /bin/ls")
        assert r.exit_code == 0, r.stderr
        assert b.read_file("/etc/passwd") == passwd
        assert b.run(["true"]).exit_code == 0
        assert b.run(["ls", "/"]).exit_code == 0
        assert a.run(["hostname"]).stdout.strip() != other
    finally:
        sleeper.signal(9)
        sleeper.close()


# --- resource exhaustion --------------------------------------------------------------------------

def _watch_pids(sandbox_id: str, stop: threading.Event, samples: list[int]) -> None:
    current = cgroup_file("pids", sandbox_id, "pids.current")
    while not stop.is_set():
        try:
            samples.append(int(current.read_text()))
        except (OSError, ValueError):
            pass
        time.sleep(0.02)


def test_fork_bomb_is_contained(engine, new_sandbox):
    sid = new_sandbox()
    a = engine.agent(sid)
    limit = int(cgroup_file("pids", sid, "pids.max").read_text())
    assert limit == 1024
    samples: list[int] = []
    stop = threading.Event()
    watcher = threading.Thread(target=_watch_pids, args=(sid, stop, samples), daemon=True)
    watcher.start()
    box: dict = {}
    bomb = threading.Thread(target=lambda: box.update(r=a.run(
        ["sh", "-c", "while true; do sleep 100 & done"], timeout=5)), daemon=True)
    t0 = time.monotonic()
    bomb.start()
    host_ok = []
    while bomb.is_alive() and time.monotonic() - t0 < 15:
        host_ok.append(subprocess.run(["true"], timeout=5).returncode == 0)  # the host can still fork
        time.sleep(0.1)
    bomb.join(15)
    stop.set()
    watcher.join(2)
    assert not bomb.is_alive(), "the fork bomb's exec never returned"
    assert "r" in box, "the fork bomb's exec failed"
    assert host_ok and all(host_ok)
    assert samples and max(samples) <= limit
    assert max(samples) >= limit - 10, f"the bomb never reached the limit ({max(samples)}): test proves nothing"
    events = cgroup_file("pids", sid, "pids.events")
    if events.exists():
        assert int(events.read_text().split()[1]) > 0  # forks were refused at the limit
    # the sandbox recovers: its agent answers, and root can clean up
    assert engine.runtime.is_alive(sid)
    a.run(["sh", "-c", "kill -9 -1"])  # every process but the agent (and this shell)
    deadline = time.monotonic() + 5
    while engine.runtime.usage(sid)["pids"] > 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert a.run(["echo", "ok"]).stdout == "ok\n"
    assert subprocess.run(["true"]).returncode == 0


def test_memory_hog_is_killed_and_agent_survives(engine, new_sandbox, base_template):
    sid = new_sandbox(base_template, memory_mb=64)
    a = engine.agent(sid)
    limit = cgroup_file("memory", sid, "memory.limit_in_bytes")
    limit = limit if limit.exists() else cgroup_file("memory", sid, "memory.max")
    assert int(limit.read_text()) == 64 * 1024 * 1024
    r = a.run(["python3", "-c", "a = b'x' * (200 * 1024 * 1024); print(len(a))"], timeout=60)
    assert r.exit_code == 137 and r.signal == 9, (r.exit_code, r.stdout, r.stderr)
    assert r.stdout == ""
    assert engine.runtime.is_alive(sid)
    assert a.run(["echo", "still here"]).stdout == "still here\n"
    small = a.run(["python3", "-c", "a = b'x' * (8 * 1024 * 1024); print(len(a))"])
    assert small.stdout == f"{8 * 1024 * 1024}\n"


def test_fork_bomb_at_the_limit_does_not_kill_the_agent(engine, new_sandbox, base_template):
    """A bomb that keeps the sandbox at its pids limit while a client connects: the connection may
    be refused, but the agent (PID 1: the whole sandbox) must survive and recover after the timeout."""
    sid = new_sandbox(base_template)
    a = engine.agent(sid)
    bomb_code = ("import os, time\n"
                 "while True:\n"
                 "    try:\n"
                 "        if os.fork() == 0:\n"
                 "            time.sleep(100); os._exit(0)\n"
                 "    except OSError:\n"
                 "        time.sleep(0.001)\n")
    box: dict = {}

    def bomb() -> None:
        try:
            box["r"] = a.run(["python3", "-c", bomb_code], timeout=4)
        except ShoalError as exc:
            box["error"] = exc

    t = threading.Thread(target=bomb, daemon=True)
    t.start()
    current = cgroup_file("pids", sid, "pids.current")
    limit = int(cgroup_file("pids", sid, "pids.max").read_text())
    deadline = time.monotonic() + 3
    while int(current.read_text() or 0) < limit and time.monotonic() < deadline:
        time.sleep(0.01)
    assert int(current.read_text()) >= limit - 2, "the bomb never reached the limit: test proves nothing"
    for _ in range(3):  # clients keep calling while the sandbox is full
        try:
            a.ping(timeout=2)
        except ShoalError:
            pass  # refusing is fine; dying is not
        time.sleep(0.1)
    t.join(20)
    assert not t.is_alive()
    assert engine.runtime.is_alive(sid), "the sandbox's agent died during the fork bomb"
    assert box.get("r") is not None and box["r"].timed_out, box
    assert a.run(["echo", "recovered"]).stdout == "recovered\n"
