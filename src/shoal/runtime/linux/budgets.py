"""Per-sandbox shares of the kernel's per-user budgets (inotify, fanotify, namespaces, signals, ...).

The kernel counts these per user namespace *and per uid*, and charges every level of the namespace
chain up to the host (``ucounts``). A sandbox's user namespace made directly by crun (host root)
charges host root's own budget at the top and has nothing per sandbox in between: one sandbox opening
128 inotify instances broke file watching for every other sandbox and for root on the host, and its
own per-namespace limits would not help (they are per uid inside, and the sandbox has 65536 uids).

So each sandbox gets two nested user namespaces, made here before crun runs:

* ``outer``: maps the sandbox's host range (as crun's did) and carries the sandbox's share as its
  ``/proc/sys/user/max_*`` limits, written from inside it (creating it gives CAP_SYS_RESOURCE there,
  and nowhere else). Everything the sandbox does is charged to one counter here, whatever its uid.
* ``inner``: identity-mapped, made by the outer's root, joined by crun. Its ``rlimit`` maxima (taken
  from the creator's soft rlimits when it is made) bound the rlimit-based counters (pending signals,
  POSIX message queue bytes) at the outer level, again once per sandbox.

The sandbox cannot change either: it has no CAP_SYS_RESOURCE (not in its bounding set), ``/proc/sys``
is read-only, and it cannot make namespaces (seccomp). The host level still adds every sandbox's
use to root's counters, so ``prepare_host`` makes the host limits hold every sandbox's share plus
what the host had. Keys are per host uid (no namespace): the seccomp filter denies the keyring calls.
The inner namespace is kept alive by a bind mount of its ``/proc/<pid>/ns/user`` in the bundle.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import resource
from pathlib import Path

from shoal.runtime.linux import mounts

CLONE_NEWUSER = 0x10000000
PR_SET_DUMPABLE = 4
USER_SYSCTL = Path("/proc/sys/user")

#: The outer namespace's ``/proc/sys/user`` limits: what one sandbox may hold at once (all its uids).
SHARES = {
    "max_inotify_instances": 128,      # the kernel's default for a whole user
    "max_inotify_watches": 32768,
    "max_fanotify_groups": 16,
    "max_fanotify_marks": 8192,
    "max_user_namespaces": 1,          # the inner one; seccomp refuses more anyway
    "max_mnt_namespaces": 16, "max_pid_namespaces": 4, "max_net_namespaces": 4, "max_ipc_namespaces": 4,
    "max_uts_namespaces": 4, "max_cgroup_namespaces": 4, "max_time_namespaces": 4,
}
#: Soft rlimits the inner namespace is made with: the sandbox's share of each rlimit-based counter.
#: The outer namespace is made with these limits raised to infinity where the daemon may (it needs
#: CAP_SYS_RESOURCE), so that only root's own rlimit bounds the host level; otherwise the host level of
#: all sandboxes together is the daemon's hard limit (e.g. 819200 queue bytes), hence modest shares.
RLIMIT_SHARES = {
    resource.RLIMIT_SIGPENDING: 4096,
    resource.RLIMIT_MSGQUEUE: 256 * 1024,  # three default-sized queues (10 x 8 KiB)
    resource.RLIMIT_MEMLOCK: 2 * 1024 * 1024,  # SHM_LOCK'd memory (mlock() is per process)
}
#: Host limits ``prepare_host`` raises: share name -> (host sysctl, what the host keeps besides sandboxes).
#: The ``fs.*`` names hold the same values as ``/proc/sys/user/max_*`` in the host namespace, but the
#: latter also ask for CAP_SYS_RESOURCE, which a confined root may lack; the former only for root.
HOST_RESERVE = {
    "max_inotify_instances": ("/proc/sys/fs/inotify/max_user_instances", 128),
    "max_inotify_watches": ("/proc/sys/fs/inotify/max_user_watches", 65536),
    "max_fanotify_groups": ("/proc/sys/fs/fanotify/max_user_groups", 128),
    "max_fanotify_marks": ("/proc/sys/fs/fanotify/max_user_marks", 8192),
}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


#: The smallest sandbox (``memory_mb``): the most sandboxes a host can hold is its RAM over this.
MIN_SANDBOX_MB = 16


def host_sandbox_capacity() -> int:
    """An upper bound on how many sandboxes this host can hold at once (by RAM)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return max(1, int(line.split()[1]) // 1024 // MIN_SANDBOX_MB)
    return 1024


def prepare_host(max_sandboxes: int | None = None) -> None:
    """Raise the host's per-user limits so ``max_sandboxes`` full shares still leave the host its own.

    These sysctls are per host user: raising them lets any host user hold as much, which is why the
    shares are modest. Never lowers a limit the operator set higher."""
    if max_sandboxes is None:
        max_sandboxes = host_sandbox_capacity()
    for name, (sysctl, reserve) in HOST_RESERVE.items():
        path = Path(sysctl)
        try:
            current = int(path.read_text())
            wanted = min(2**31 - 1, reserve + max_sandboxes * SHARES[name])
            if current < wanted:
                path.write_text(f"{wanted}\n")
        except (OSError, ValueError):
            continue  # an older kernel without this limit


def _check(rc: int, what: str) -> None:
    if rc != 0:
        no = ctypes.get_errno()
        raise OSError(no, f"{what}: {os.strerror(no)}")


def make_userns(target: Path, uid_base: int, uid_count: int) -> None:
    """Create the sandbox's namespaces (see the module docstring) and bind-mount the inner at ``target``.

    A forked helper makes the outer namespace; the host maps it; the helper writes the limits, becomes
    the outer's root and forks a second helper that makes the inner one, whose map the first writes
    (a map can only be written from the namespace's parent). The host then bind-mounts the inner."""
    to_child_r, to_child_w = os.pipe2(os.O_CLOEXEC)
    to_parent_r, to_parent_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child: syscalls only, then _exit
        code = 1
        try:
            # Everything else the parent had open (a sandbox's log, a layer's files: other threads are
            # busy creating and stopping sandboxes) must not stay open here, or it keeps their mounts busy.
            for low, high in ((0, min(to_child_r, to_parent_w)), (max(to_child_r, to_parent_w) + 1, 1 << 20)):
                os.closerange(max(low, 3), high)
            between = range(min(to_child_r, to_parent_w) + 1, max(to_child_r, to_parent_w))
            os.closerange(between.start, between.stop)
            code = _outer_helper(to_child_r, to_parent_w, uid_count)
        finally:
            os._exit(code)
    os.close(to_child_r)
    os.close(to_parent_w)
    mounted = False
    try:
        _expect(to_parent_r, b"O")            # the helper is in the outer namespace
        _write_maps(pid, f"0 {uid_base} {uid_count}\n")
        os.write(to_child_w, b"m")
        reply = os.read(to_parent_r, 32)      # b"I<pid>": the inner namespace's holder
        if not reply.startswith(b"I"):
            raise OSError(0, "the user namespace helper failed before making the inner namespace")
        target.touch(mode=0o600)
        mounts.mount(f"/proc/{int(reply[1:])}/ns/user", target, "", mounts.MS_BIND)
        mounted = True
    finally:
        try:
            os.write(to_child_w, b"d")
        except OSError:
            pass
        os.close(to_child_w)
        os.close(to_parent_r)
        _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        if mounted:
            mounts.umount(target)
        raise OSError(0, f"making the sandbox's user namespaces failed (exit {os.waitstatus_to_exitcode(status)})")


def _expect(fd: int, token: bytes) -> None:
    if os.read(fd, 1) != token:
        raise OSError(0, f"the user namespace helper stopped before step {token!r}")


def _write_maps(pid: int, line: str) -> None:
    """Write a uid and gid map (os.write: a refused map must raise here, not at a buffered close)."""
    for name in ("uid_map", "gid_map"):
        fd = os.open(f"/proc/{pid}/{name}", os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def _outer_helper(from_host: int, to_host: int, uid_count: int) -> int:  # pragma: no cover - forked child
    for which in RLIMIT_SHARES:  # the outer namespace's maxima bound the host level (see RLIMIT_SHARES)
        try:
            resource.setrlimit(which, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        except (OSError, ValueError):
            pass
    _check(_libc.unshare(CLONE_NEWUSER), "unshare outer")
    os.write(to_host, b"O")
    if os.read(from_host, 1) != b"m":
        return 2
    for name, value in SHARES.items():  # CAP_SYS_RESOURCE in the outer namespace: its limits are ours
        try:
            (USER_SYSCTL / name).write_text(f"{value}\n")
        except FileNotFoundError:
            pass
    os.setgroups([])
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)  # the outer's root (the sandbox's host uid) owns the inner namespace
    # Changing uid made this process undumpable, so its /proc files (and its child's uid_map) belong to
    # host root, out of reach from this namespace: make it dumpable again (nothing else can reach it).
    _check(_libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    for which, value in RLIMIT_SHARES.items():
        _soft, hard = resource.getrlimit(which)
        resource.setrlimit(which, (value if hard == resource.RLIM_INFINITY else min(value, hard), hard))
    ready_r, ready_w = os.pipe2(os.O_CLOEXEC)
    hold_r, hold_w = os.pipe2(os.O_CLOEXEC)
    inner = os.fork()
    if inner == 0:
        code = 1
        try:
            os.close(ready_r)
            os.close(hold_w)
            _check(_libc.unshare(CLONE_NEWUSER), "unshare inner")
            os.write(ready_w, b"U")
            os.read(hold_r, 1)  # stay until the host holds the namespace
            code = 0
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(hold_r)
    try:
        if os.read(ready_r, 1) != b"U":
            return 3
        _write_maps(inner, f"0 0 {uid_count}\n")
        os.write(to_host, b"I%d" % inner)
        return 0 if os.read(from_host, 1) == b"d" else 4
    finally:
        os.close(hold_w)
        os.close(ready_r)
        _, status = os.waitpid(inner, 0)
