"""Pause modes, persistence across a (simulated) host reboot, and SIGKILL in the middle of a filesystem
pause or resume (issue 10).

``pause`` (memory) freezes; ``pause(mode="filesystem")`` stops every process, frees the memory and keeps
the files on disk; resume starts the sandbox again from them with a new ``boot_id``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import pytest

from shoal.engine.engine import HOST_RESTART_REASON, Engine
from shoal.engine.models import SandboxState
from shoal.errors import InvalidRequest, InvalidTransition
from shoal.runtime.linux import cgroups, mounts
from shoal.storage.layers import loop_backing

CYCLES = 50


def _check_files(engine: Engine, sid: str, count: int) -> None:
    r = engine.agent(sid).run(["sh", "-c", "cat /data/* | wc -l; cat /data/f$N"], env={"N": str(count - 1)})
    assert r.exit_code == 0, r.stderr
    lines = r.stdout.split("\n")
    assert int(lines[0]) == count and lines[1] == f"file {count - 1} " + "x" * 100


@pytest.mark.parametrize("mode", ["memory", "filesystem"])
def test_pause_resume_cycles_lose_nothing(engine: Engine, new_sandbox: Callable[..., str], mode: str) -> None:
    sid = new_sandbox()
    agent = engine.agent(sid)
    agent.run(["mkdir", "/data"])
    boots = {engine.get(sid).boot_id}
    for i in range(CYCLES):
        w = engine.agent(sid).run(["sh", "-c", f"printf 'file {i} %s\\n' {'x' * 100} > /data/f{i}"])
        assert w.exit_code == 0, w.stderr
        rec = engine.pause(sid, mode=mode)
        assert rec.state is SandboxState.PAUSED and rec.pause_mode == mode
        assert engine.get(sid).pause_mode == mode
        rec = engine.resume(sid)
        assert rec.state is SandboxState.RUNNING and rec.pause_mode is None
        boots.add(rec.boot_id)
        _check_files(engine, sid, i + 1)
    # A filesystem pause is a new boot each time; a memory pause keeps the same processes.
    assert len(boots) == (CYCLES + 1 if mode == "filesystem" else 1)


def test_filesystem_pause_stops_processes_and_frees_memory(engine: Engine, new_sandbox: Callable[..., str]) -> None:
    sid = new_sandbox()
    agent = engine.agent(sid)
    agent.run(["sh", "-c", "echo kept > /root/file; sleep 1000 >/dev/null 2>&1 &"])
    assert "sleep 1000" in agent.run(["ps"]).stdout
    old_pid = engine.runtime.init_pid(sid)
    name = engine.runtime.container(sid)
    engine.pause(sid, mode="filesystem")
    assert cgroups.pids(name) == [] and not any(cgroups._dirs(name))
    assert not mounts.mounts_under(engine.runtime.bundle(sid))
    assert loop_backing(engine.runtime.layers.image(sid)) == []
    assert old_pid is not None and _gone(old_pid)
    with pytest.raises(InvalidTransition):
        engine.agent(sid)
    with pytest.raises(InvalidTransition):
        engine.pause(sid, mode="filesystem")
    engine.resume(sid)
    assert engine.agent(sid).run(["cat", "/root/file"]).stdout == "kept\n"
    assert "sleep 1000" not in engine.agent(sid).run(["ps"]).stdout


def test_boot_id_is_the_sandboxs_own_and_new_at_each_start(engine: Engine, new_sandbox: Callable[..., str]) -> None:
    """Inside, ``/proc/sys/kernel/random/boot_id`` is the record's boot id, never the host's; a filesystem
    resume is a new boot (E2B's SDK checks that a filesystem-only resume cold-booted), a memory pause is not."""
    def inside(sid: str) -> str:
        return engine.agent(sid).run(["cat", "/proc/sys/kernel/random/boot_id"]).stdout.strip()

    with open("/proc/sys/kernel/random/boot_id") as f:
        host = f.read().strip()
    a, b = new_sandbox(), new_sandbox()
    first = inside(a)
    assert first == engine.get(a).boot_id and first != host and first != inside(b)
    assert engine.agent(a).run(["sh", "-c", "echo x > /proc/sys/kernel/random/boot_id"]).exit_code != 0
    engine.pause(a)
    engine.resume(a)
    assert inside(a) == first
    engine.pause(a, mode="filesystem")
    engine.resume(a)
    assert inside(a) == engine.get(a).boot_id != first


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_memory_pause_can_go_on_to_filesystem(engine: Engine, new_sandbox: Callable[..., str]) -> None:
    sid = new_sandbox()
    engine.agent(sid).run(["sh", "-c", "echo v > /v"])
    assert engine.pause(sid).pause_mode == "memory"
    assert engine.pause(sid, mode="filesystem").pause_mode == "filesystem"
    engine.resume(sid)
    assert engine.agent(sid).run(["cat", "/v"]).stdout == "v\n"


def test_bad_pause_mode_is_refused(engine: Engine, new_sandbox: Callable[..., str]) -> None:
    sid = new_sandbox()
    with pytest.raises(InvalidRequest, match="pause mode"):
        engine.pause(sid, mode="disk")
    assert engine.get(sid).state is SandboxState.RUNNING


# --- host reboot --------------------------------------------------------------------------------------------
def _simulate_reboot(engine: Engine, sandbox_ids: list[str]) -> None:
    """What a host reboot does to a sandbox: every process, cgroup, mount, loop device and run-dir file
    gone; the state directory stays. Done with the host's tools, not with the runtime's own teardown."""
    for sid in sandbox_ids:
        name = engine.runtime.container(sid)
        cgroups.thaw(name)
        cgroups.kill_all(name)
        deadline = time.monotonic() + 10
        while cgroups.pids(name) and time.monotonic() < deadline:
            time.sleep(0.01)
        cgroups.remove(name)
        bundle = engine.runtime.bundle(sid)
        for point in mounts.mounts_under(bundle):
            mounts.umount(point, lazy=True)
        shutil.rmtree(bundle, ignore_errors=True)
        shutil.rmtree(engine.settings.crun_root / name, ignore_errors=True)


def test_files_survive_a_host_reboot(engine: Engine, new_sandbox: Callable[..., str]) -> None:
    disk = new_sandbox()
    frozen = new_sandbox()
    ram = new_sandbox(layer="ram")
    for sid in (disk, frozen, ram):
        engine.agent(sid).run(["sh", "-c", f"echo {sid} > /root/id"])
    engine.pause(frozen)
    _simulate_reboot(engine, [disk, frozen, ram])
    if engine.network is not None:  # a reboot empties the run directory: no network slot survives it
        for sid in (disk, frozen, ram):
            engine.network.release(sid)

    Engine().reconcile()  # what `shoal serve` does when it starts

    for sid in (disk, frozen):
        rec = engine.get(sid)
        assert rec.state is SandboxState.PAUSED and rec.pause_mode == "filesystem", rec
        # the start-up reconcile says "host restart"; a daemon of this instance running meanwhile (as in the
        # test suite) may have seen the agents die first and said so: both keep the files
        assert rec.reason == HOST_RESTART_REASON or rec.reason.startswith("its agent (PID 1)"), rec.reason
        engine.resume(sid)
        assert engine.agent(sid).run(["cat", "/root/id"]).stdout == f"{sid}\n"
        assert engine.get(sid).reason is None
        if engine.network is not None:  # it comes back with a network of its own, not loopback only
            devices = engine.agent(sid).read_file("/proc/net/dev").decode().splitlines()[2:]
            assert len(devices) == 2 and engine.get(sid).address, devices
    # a ram layer does not outlive its host: deleted by the start-up reconcile, or already failed (error)
    # by a daemon of this instance that saw its agent die first (as in the test suite)
    left = {r.id: r for r in engine.store.all()}
    assert ram not in left or left[ram].state is SandboxState.ERROR, left.get(ram)


# --- SIGKILL in the middle ----------------------------------------------------------------------------------
_CHILD = textwrap.dedent("""
    import os, sys
    from shoal.engine.engine import Engine
    sid, point = sys.argv[1], sys.argv[2]
    engine = Engine()
    rt = engine.runtime
    die = lambda *a, **k: os.kill(os.getpid(), 9)
    if point == "before-stop":          # the record says paused; nothing on the host was touched yet
        rt.stop = die
    elif point == "processes-killed":   # crun killed everything; the mounts are still there
        def stop(s):
            rt._crun("delete", "-f", rt.container(s))
            die()
        rt.stop = stop
    elif point == "resumed-unrecorded":  # the sandbox runs again; the record still says paused
        create = rt.create
        def started(spec):
            create(spec)
            die()
        rt.create = started
    if point == "resumed-unrecorded":
        engine.resume(sid)
    else:
        engine.pause(sid, mode="filesystem")
    sys.exit(3)  # not reached
""")


@pytest.mark.parametrize("point", ["before-stop", "processes-killed", "resumed-unrecorded"])
def test_sigkill_during_filesystem_pause_or_resume(engine: Engine, new_sandbox: Callable[..., str],
                                                   point: str) -> None:
    sid = new_sandbox()
    engine.agent(sid).run(["sh", "-c", "echo acknowledged > /root/w && sync"])
    if point == "resumed-unrecorded":
        engine.pause(sid, mode="filesystem")
    child = subprocess.run([sys.executable, "-c", _CHILD, sid, point], capture_output=True, timeout=120)
    assert child.returncode == -9, child.stderr.decode()[-2000:]
    assert engine.get(sid).state is SandboxState.PAUSED

    engine.reconcile()

    rec = engine.get(sid)
    assert rec.state is SandboxState.PAUSED and rec.pause_mode == "filesystem"
    name = engine.runtime.container(sid)
    assert cgroups.pids(name) == [] and not mounts.mounts_under(engine.runtime.bundle(sid))
    assert not engine.runtime.bundle(sid).exists()
    assert loop_backing(engine.runtime.layers.image(sid)) == []
    engine.resume(sid)
    assert engine.agent(sid).run(["cat", "/root/w"]).stdout == "acknowledged\n"
