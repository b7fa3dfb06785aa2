"""Sandbox lifecycle and cleanup: destroy frees every host resource, reconcile frees what crashed
processes left behind, and bad requests leave nothing behind. Real sandboxes, real host state."""

from __future__ import annotations

import os
import secrets
import select
import signal
import string
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shoal.engine.models import SandboxRecord, SandboxState
from shoal.errors import InvalidRequest, NotFound, RuntimeFailure, ShoalError
from shoal.runtime.linux import cgroups, mounts
from shoal.settings import Settings

PREFIX = Settings().resource_prefix  # this run's instance: shoal-<instance>-<sandbox>

SRC = str(Path(__file__).resolve().parent.parent / "src")


def fake_id() -> str:
    """A valid sandbox id that no real sandbox has (real ones are random too; this prefix marks ours)."""
    return "zz" + "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(10))


def host_pids(engine, sandbox_id: str) -> list[int]:
    pids = set(cgroups.pids(engine.runtime.container(sandbox_id)))
    init = engine.runtime.init_pid(sandbox_id)
    if init:
        pids.add(init)
    return sorted(pids)


def reconcile_for_sure(engine, timeout: float = 30.0) -> set[str]:
    """One reconcile pass that really ran; the ids it cleaned.

    ``reconcile()`` returns ``[]`` when another process holds its lock, so "reconcile spares X"
    would hold without anything being checked. A control orphan (a bundle directory no record
    explains) proves the pass ran: a pass that ran cleans it, one that was skipped does not.
    """
    control = fake_id()
    engine.runtime.bundle(control).mkdir(parents=True)
    deadline = time.monotonic() + timeout
    try:
        while True:
            cleaned = set(engine.reconcile())
            if control in cleaned:
                return cleaned - {control}
            assert time.monotonic() < deadline, f"no reconcile pass ran within {timeout} s (the lock stayed taken)"
            time.sleep(0.05)
    finally:
        engine.runtime.destroy(control)


def reconcile_until(engine, wanted: set[str], timeout: float = 10.0) -> set[str]:
    """Reconcile until every id in ``wanted`` was cleaned (another process may hold the lock)."""
    cleaned: set[str] = set()
    deadline = time.monotonic() + timeout
    while not wanted <= cleaned and time.monotonic() < deadline:
        cleaned |= reconcile_for_sure(engine)
    return cleaned


# --- destroy ------------------------------------------------------------------------------------

def test_destroy_frees_every_host_resource(engine, new_sandbox, leftovers):
    sid = new_sandbox()
    a = engine.agent(sid)
    bg = a.start(["sh", "-c", "sleep 1000 & sleep 1001"])
    bg.close()
    a.write_file("/root/data.bin", os.urandom(1024 * 1024))
    assert any(r.id == sid and r.state is SandboxState.RUNNING for r in engine.list())
    pids = host_pids(engine, sid)
    assert len(pids) >= 3, pids  # the agent and both sleeps
    before = leftovers(sid, pids)
    # the checker sees every kind of resource while the sandbox lives (or this test proves nothing)
    for kind in ("mount", "cgroup", "bundle", "crun state", "process", "store record"):
        assert any(item.startswith(kind) for item in before), (kind, before)

    engine.destroy(sid)

    assert leftovers(sid, pids) == []
    assert sid not in {r.id for r in engine.list()}
    assert sid not in engine.runtime.existing()
    # the template image stays mounted for the other sandboxes
    assert mounts.is_mounted(engine.templates.mount("minimal"))


def test_destroy_twice(engine, new_sandbox, leftovers):
    sid = new_sandbox()
    engine.destroy(sid)
    with pytest.raises(NotFound):
        engine.destroy(sid)
    assert leftovers(sid) == []


def test_use_after_destroy(engine, new_sandbox):
    sid = new_sandbox()
    a = engine.agent(sid)
    engine.destroy(sid)
    with pytest.raises(NotFound):
        engine.agent(sid)
    with pytest.raises(NotFound):
        engine.run(sid, ["true"])
    with pytest.raises(NotFound):
        a.run(["true"])  # a client made before the destroy
    with pytest.raises(NotFound):
        engine.get(sid)


def test_destroy_ends_live_streams(engine, new_sandbox, leftovers):
    sid = new_sandbox()
    a = engine.agent(sid)
    stream = a.start(["sleep", "1000"])
    pids = host_pids(engine, sid)
    box: dict = {}

    def follow() -> None:
        try:
            box["result"] = stream.wait()
        except ShoalError as exc:
            box["error"] = exc

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    engine.destroy(sid)
    t.join(10)
    assert not t.is_alive(), "a stream of a destroyed sandbox hangs"
    assert isinstance(box.get("error"), RuntimeFailure) or box.get("result") is not None, box
    assert leftovers(sid, pids) == []


def test_destroy_with_files_held_open_and_busy_mounts(engine, new_sandbox, leftovers):
    """Open files, a process with its cwd deep in the overlay, a full /dev/shm: destroy still frees all."""
    sid = new_sandbox()
    a = engine.agent(sid)
    a.mkdir("/root/deep/dir")
    a.start(["sh", "-c", "exec 3</root/deep; exec 4>/dev/shm/x; sleep 1000"], cwd="/root/deep/dir").close()
    a.run(["sh", "-c", "head -c 1048576 /dev/zero > /dev/shm/filler"])
    pids = host_pids(engine, sid)
    engine.destroy(sid)
    assert leftovers(sid, pids) == []


def test_many_sandboxes_in_parallel(engine, leftovers, minimal_template):
    ids: list[str] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def one() -> None:
        try:
            rec = engine.create(minimal_template, wait=True)
            with lock:
                ids.append(rec.id)
            assert engine.run(rec.id, ["cat", "/etc/hostname"]).stdout == rec.id + "\n"
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(6)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads), "a create hangs"
        assert not errors, errors
        assert len(set(ids)) == 6
    finally:
        for sid in ids:
            try:
                engine.destroy(sid)
            except NotFound:
                pass
    for sid in ids:
        assert leftovers(sid) == []


# --- reconcile ----------------------------------------------------------------------------------

OWNER_SCRIPT = """
import os, sys, time
from shoal.engine.engine import Engine
rec = Engine().create("minimal", owner_pid=os.getpid(), wait=True)
print(rec.id, flush=True)
time.sleep(600)
"""


def test_reconcile_after_owner_sigkill(engine, leftovers, sandbox):
    env = dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-c", OWNER_SCRIPT], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env=env)
    sid = ""
    try:
        ready, _, _ = select.select([child.stdout], [], [], 30)
        assert ready, "the owner process never printed its sandbox id"
        sid = child.stdout.readline().decode().strip()  # type: ignore[union-attr]
        assert sid, child.stderr.read().decode()  # type: ignore[union-attr]
        rec = engine.get(sid)
        assert rec.owner_pid == child.pid and rec.state is SandboxState.RUNNING
        assert engine.run(sid, ["echo", "owned"]).stdout == "owned\n"
        # while its owner lives, reconcile leaves it (and every healthy sandbox) alone
        assert sid not in reconcile_for_sure(engine)
        assert engine.run(sid, ["true"]).ok
        pids = host_pids(engine, sid)

        child.send_signal(signal.SIGKILL)
        child.wait(10)

        cleaned = reconcile_until(engine, {sid})
        assert sid in cleaned
        assert sandbox not in cleaned
        assert leftovers(sid, pids) == []
        assert engine.run(sandbox, ["echo", "untouched"]).stdout == "untouched\n"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if sid:
            engine.runtime.destroy(sid)
            try:
                engine.destroy(sid)
            except NotFound:
                pass


@pytest.fixture
def lone_engine():
    """An Engine of an instance of its own: the suite's daemon (same instance as ``engine``) would notice
    a dead agent within a second and handle it itself, before the reconcile this test is about."""
    import shutil
    import tempfile

    from conftest import USER_STATE_DIR, _seed_templates
    from shoal.engine.engine import Engine
    from shoal.net.network import Network

    root = Path(tempfile.mkdtemp(prefix="shoal-test-lone-", dir="/var/tmp"))
    os.chmod(root, 0o711)
    (root / "state").mkdir(mode=0o711)
    _seed_templates(USER_STATE_DIR / "templates", root / "state" / "templates")
    settings = Settings(state_dir=root / "state", run_dir=root / "run")
    engine = Engine(settings)
    try:
        yield engine
    finally:
        net = Network._instances.get(settings.instance)
        if net is not None:
            net.close()
        engine.runtime.userns_pool.close()
        mounts.umount_tree(root)
        shutil.rmtree(root, ignore_errors=True)


def test_reconcile_when_the_agent_died(lone_engine):
    from conftest import host_leftovers

    engine = lone_engine
    sid = engine.create("minimal", wait=True).id
    init = engine.runtime.init_pid(sid)
    assert init and engine.runtime.is_alive(sid)
    os.kill(init, signal.SIGKILL)  # pid 1 of the sandbox: the whole sandbox dies with it
    deadline = time.monotonic() + 5
    while engine.runtime.is_alive(sid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.runtime.is_alive(sid)
    with pytest.raises(ShoalError):
        engine.run(sid, ["true"])
    assert sid in reconcile_until(engine, {sid})
    assert host_leftovers(engine, sid, [init]) == []


def test_reconcile_frees_resources_without_a_record(engine, leftovers):
    """What a process killed mid-create leaves: host resources the store knows nothing about."""
    bundle_only, crun_only, cgroup_only = fake_id(), fake_id(), fake_id()
    bundle = engine.runtime.bundle(bundle_only)
    made_cgroups: list[Path] = []
    try:
        (bundle / "upper").mkdir(parents=True)
        mounts.mount("tmpfs", bundle / "upper", "tmpfs", 0, "size=1m")
        (bundle / "upper" / "file").write_text("left behind")
        (engine.settings.crun_root / f"{PREFIX}{crun_only}").mkdir(parents=True)
        for controller in ("pids", "memory"):
            d = Path("/sys/fs/cgroup") / controller / f"{PREFIX}{cgroup_only}"
            if d.parent.is_dir():
                d.mkdir()
                made_cgroups.append(d)
        if not made_cgroups and cgroups.mode() == "v2":
            d = Path("/sys/fs/cgroup") / f"{PREFIX}{cgroup_only}"
            d.mkdir()
            made_cgroups.append(d)
        assert made_cgroups
        assert leftovers(bundle_only) and leftovers(crun_only) and leftovers(cgroup_only)

        cleaned = reconcile_until(engine, {bundle_only, crun_only, cgroup_only})
        assert {bundle_only, crun_only, cgroup_only} <= cleaned
        for sid in (bundle_only, crun_only, cgroup_only):
            assert leftovers(sid) == [], sid
    finally:
        mounts.umount_tree(bundle)
        for d in made_cgroups:
            if d.exists():
                d.rmdir()
        for sid in (bundle_only, crun_only):
            engine.runtime.destroy(sid)


def test_reconcile_creating_record_of_a_dead_owner(engine, leftovers):
    """A create interrupted after the store was written: state ``creating``, its owner gone."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    sid = fake_id()
    rec = SandboxRecord(id=sid, template="minimal", state=SandboxState.CREATING, cpu=1.0, memory_mb=64,
                        disk_mb=64, created_at=time.time(), owner_pid=dead.pid, owner_start=12345)
    engine.store.put(rec)
    bundle = engine.runtime.bundle(sid)
    try:
        (bundle / "upper").mkdir(parents=True)
        mounts.mount("tmpfs", bundle / "upper", "tmpfs", 0, "size=1m")
        assert sid in reconcile_until(engine, {sid})
        assert leftovers(sid) == []
    finally:
        mounts.umount_tree(bundle)
        engine.runtime.destroy(sid)
        engine.store.delete(sid)


def test_reconcile_spares_a_create_in_progress(engine):
    """A ``creating`` record whose owner is alive (this process) is a sandbox being born, not a leak."""
    sid = fake_id()
    me = os.getpid()
    from shoal.engine.engine import process_start_time
    rec = SandboxRecord(id=sid, template="minimal", state=SandboxState.CREATING, cpu=1.0, memory_mb=64,
                        disk_mb=64, created_at=time.time(), owner_pid=me, owner_start=process_start_time(me))
    engine.store.put(rec)
    try:
        engine.runtime.bundle(sid).mkdir()
        assert sid not in reconcile_for_sure(engine)
        assert engine.get(sid).state is SandboxState.CREATING
        assert engine.runtime.bundle(sid).exists()
    finally:
        engine.runtime.destroy(sid)
        engine.store.delete(sid)


# --- bad requests leave nothing behind ----------------------------------------------------------

def _host_state(engine) -> tuple[set[str], set[str]]:
    """Host resources no record explains, and records this process owns (a create in progress or
    a leaked one). Other processes may create and destroy sandboxes meanwhile; neither set moves."""
    records = engine.list()
    orphans = engine.runtime.existing() - {r.id for r in records}
    mine = {r.id for r in records if r.owner_pid == os.getpid()}
    return orphans, mine


def test_unknown_template(engine):
    before = _host_state(engine)
    with pytest.raises(NotFound):
        engine.create("no-such-template")
    assert _host_state(engine) == before


def test_bad_resources(engine):
    before = _host_state(engine)
    for kwargs in ({"cpu": 0}, {"cpu": -1}, {"cpu": 1000}, {"cpu": float("nan")}, {"memory_mb": 1},
                   {"memory_mb": 10**9}, {"memory_mb": "512"}, {"disk_mb": 0}, {"cpu": None},
                   {"env": {"A=B": "x"}}, {"env": {"OK": "nul\0"}}):
        with pytest.raises(InvalidRequest):
            engine.create("minimal", **kwargs)
    assert _host_state(engine) == before


def test_nonexistent_sandbox(engine):
    for sid in ("nonexistent00", "zzzzzzzzzzzz", "Bad-ID", "../../etc", "", "a" * 100):
        with pytest.raises(NotFound):
            engine.run(sid, ["true"])
        with pytest.raises(NotFound):
            engine.get(sid)
        with pytest.raises(NotFound):
            engine.destroy(sid)
