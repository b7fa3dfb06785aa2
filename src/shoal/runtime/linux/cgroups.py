"""cgroups behind one interface for hybrid/v1 hosts (this machine) and pure v2 hosts (most others).

crun creates and configures each sandbox's group from the OCI config (``cgroupsPath`` =
``/shoal-<instance>-<id>``, the name the runtime passes to every function here); this module prepares
the host, reads usage, freezes, and removes what a crashed run left behind. On this kind of host
crun refuses "hybrid" mode while any controller sits in the empty v2 tree; mounting the v1 ``hugetlb``
hierarchy moves the last one (hugetlb) out of it.
"""

from __future__ import annotations

import errno
import functools
import os
import time
from pathlib import Path

from shoal.runtime.linux import mounts

ROOT = Path("/sys/fs/cgroup")
V1_CONTROLLERS = ("cpu", "cpuacct", "cpuset", "memory", "pids", "freezer", "devices", "blkio", "hugetlb",
                  "net_cls", "net_prio", "perf_event", "systemd", "unified")


@functools.cache
def mode() -> str:
    """``"v2"`` on a unified host, else ``"v1"`` (legacy or hybrid); a host does not change it while a
    process runs (asked on every exec's path, so asked of the kernel once)."""
    return "v2" if (ROOT / "cgroup.controllers").exists() else "v1"


def prepare_host() -> None:
    """Make crun usable here: on hybrid hosts, take every controller out of the v2 tree."""
    if mode() == "v2":
        return
    unified = ROOT / "unified" / "cgroup.controllers"
    try:
        leftover = unified.read_text().split()
    except OSError:
        return
    for controller in leftover:  # usually only "hugetlb"
        point = ROOT / controller
        point.mkdir(exist_ok=True)
        if not mounts.is_mounted(point):
            mounts.mount("cgroup", point, "cgroup", 0, controller)


def cgroups_path(name: str) -> str:
    """The OCI ``linux.cgroupsPath`` of the group ``name``."""
    return "/" + name


def _dirs(name: str) -> list[Path]:
    if mode() == "v2":
        return [ROOT / name]
    return [ROOT / c / name for c in V1_CONTROLLERS if (ROOT / c / name).is_dir()]


def exists(name: str) -> bool:
    """Whether the group ``name`` is in any hierarchy."""
    return bool(_dirs(name))


def _controller_dir(controller: str, name: str) -> Path:
    return ROOT / name if mode() == "v2" else ROOT / controller / name


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def usage(name: str) -> dict[str, int | None]:
    """Memory in bytes, CPU time in microseconds, the number of tasks and of OOM kills of a sandbox."""
    if mode() == "v2":
        d = _controller_dir("", name)
        cpu = None
        try:
            for line in (d / "cpu.stat").read_text().splitlines():
                if line.startswith("usage_usec"):
                    cpu = int(line.split()[1])
        except OSError:
            pass
        return {"memory_bytes": _read_int(d / "memory.current"), "cpu_usec": cpu,
                "pids": _read_int(d / "pids.current"), "oom_kills": _read_key(d / "memory.events", "oom_kill")}
    ns = _read_int(_controller_dir("cpuacct", name) / "cpuacct.usage")
    memory = _controller_dir("memory", name)
    return {"memory_bytes": _read_int(memory / "memory.usage_in_bytes"),
            "cpu_usec": ns // 1000 if ns is not None else None,
            "pids": _read_int(_controller_dir("pids", name) / "pids.current"),
            "oom_kills": _read_key(memory / "memory.oom_control", "oom_kill")}


def oom_kills(name: str) -> int | None:
    """How many processes the OOM killer took in the sandbox so far (one file read: on every exec's path)."""
    return _read_key(_oom_file(name), "oom_kill")


@functools.lru_cache(maxsize=4096)
def _oom_file(name: str) -> str:
    if mode() == "v2":
        return str(_controller_dir("", name) / "memory.events")
    return str(_controller_dir("memory", name) / "memory.oom_control")


def _read_key(path: Path | str, key: str) -> int | None:
    """The value of ``key`` in a flat keyed file (``memory.events``, ``memory.oom_control``)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            data = os.read(fd, 4096)
        finally:
            os.close(fd)
        wanted = key.encode()
        for line in data.split(b"\n"):
            name, _, value = line.partition(b" ")
            if name == wanted:
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def pids(name: str) -> list[int]:
    """Every host pid still in the sandbox's group (empty once it is gone)."""
    path = _controller_dir("pids", name) / "cgroup.procs"
    try:
        return [int(x) for x in path.read_text().split()]
    except (OSError, ValueError):
        return []


def thaw(name: str) -> None:
    """Unfreeze the group if frozen: a frozen task cannot act on SIGKILL, so teardown thaws first."""
    if mode() == "v2":
        path = _controller_dir("", name) / "cgroup.freeze"
        value = "0"
    else:
        path = _controller_dir("freezer", name) / "freezer.state"
        value = "THAWED"
    try:
        if path.read_text().strip() not in ("0", "THAWED"):
            path.write_text(value)
    except OSError:
        pass


def freeze(name: str, timeout: float = 2.0) -> bool:
    """Freeze every task of the group and wait until the kernel says all are frozen (what ``crun pause``
    does, without starting a crun process: ~5 ms less on a snapshot's or a standby's path). False if the
    group is not there or did not freeze in time (the caller falls back to crun)."""
    v2 = mode() == "v2"
    if v2:  # asked in cgroup.freeze; done when cgroup.events has the line "frozen 1"
        control, value = _controller_dir("", name) / "cgroup.freeze", "1"
        events = _controller_dir("", name) / "cgroup.events"
    else:  # freezer.state reads FREEZING, then FROZEN
        control = events = _controller_dir("freezer", name) / "freezer.state"
        value = "FROZEN"
    deadline = time.monotonic() + timeout
    delay = 0.0002
    try:
        control.write_text(value)
        while True:
            text = events.read_text()
            if ("frozen 1" in text.splitlines()) if v2 else (text.strip() == "FROZEN"):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.01)
            if not v2:
                control.write_text(value)  # FREEZING can need another nudge (crun writes it again too)
    except OSError:
        return False


def frozen(name: str) -> bool:
    """True while the group is frozen (or freezing)."""
    if mode() == "v2":
        path, thawed = _controller_dir("", name) / "cgroup.freeze", "0"
    else:
        path, thawed = _controller_dir("freezer", name) / "freezer.state", "THAWED"
    try:
        return path.read_text().strip() != thawed
    except OSError:
        return False


def kill_all(name: str) -> None:
    """SIGKILL everything in the group; the last resort when crun's state is gone."""
    d = _controller_dir("", name) if mode() == "v2" else None
    if d is not None and (d / "cgroup.kill").exists():
        try:
            (d / "cgroup.kill").write_text("1")
            return
        except OSError:
            pass
    for pid in pids(name):
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass


def remove(name: str) -> None:
    """Remove the sandbox's groups in every hierarchy (idempotent)."""
    for d in _dirs(name):
        for sub in sorted(d.glob("**/"), key=lambda p: len(p.parts), reverse=True):
            for attempt in range(50):  # EBUSY while the kernel is still letting the last task go
                try:
                    sub.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as exc:
                    if exc.errno != errno.EBUSY or attempt == 49:
                        raise
                    time.sleep(0.01)


def existing(prefix: str) -> set[str]:
    """What follows ``prefix`` in the names of the groups on this host that start with it, in any hierarchy.

    Only one instance's prefix: another instance's groups are not ours to judge."""
    roots = [ROOT] if mode() == "v2" else [ROOT / c for c in V1_CONTROLLERS]
    found: set[str] = set()
    for root in roots:
        try:
            for entry in os.scandir(root):
                if entry.name.startswith(prefix) and entry.is_dir():
                    found.add(entry.name[len(prefix):])
        except OSError:
            continue
    return found
