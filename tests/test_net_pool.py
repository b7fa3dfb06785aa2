"""The network slot pool under churn: every slot handed to a sandbox is whole and stays its own.

The bug this holds down: a create failed with ``crun failed to start the sandbox: open .../net/ns/2: No
such file or directory``. Two releases of one sandbox (two deletes, or a delete beside ``check_health``
after its agent died) both read its slot number; the first freed the slot, the pool made the number
again for the next sandbox, and the second tore that new slot down. The fix: a slot's owner file is the
one truth, changed only by compare-and-swap under the instance lock (``shoal.net.owners``).

Real sandboxes, real namespaces, a real daemon and a real second process; no mocks. The races are
provoked by many rounds of concurrent work, and checked by state (who owns each slot, whether its
namespace is mounted), never by timing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import httpx
import pytest

from conftest import start_daemon, stop_daemon
from shoal.engine.engine import Engine
from shoal.errors import ShoalError
from shoal.net import names


def _slot_problems(engine: Engine, sandbox_id: str) -> list[str]:
    """What is wrong with ``sandbox_id``'s slot on the host (empty: it owns a whole slot)."""
    net = engine.network
    slot = net.slot_of(sandbox_id)
    if slot is None:
        return [f"{sandbox_id}: no slot"]
    problems = []
    path, ns, sysfs = net._paths(slot)
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        owner = f"unreadable ({exc})"
    if not isinstance(owner, dict) or owner.get("sandbox") != sandbox_id:
        problems.append(f"{sandbox_id}: slot {slot} is owned by {owner}")
    if not os.path.ismount(ns):
        problems.append(f"{sandbox_id}: namespace {ns} is not mounted")
    if not os.path.ismount(sysfs):
        problems.append(f"{sandbox_id}: sysfs {sysfs} is not mounted")
    if not Path(f"/sys/class/net/{names.veth(engine.settings.instance, slot)}").exists():
        problems.append(f"{sandbox_id}: veth of slot {slot} is gone")
    return problems


def _together(*calls: Callable[[], object]) -> list[BaseException]:
    """Run ``calls`` on threads at once (released by one barrier); the errors they raised."""
    barrier = threading.Barrier(len(calls))
    errors: list[BaseException] = []

    def run(fn: Callable[[], object]) -> None:
        barrier.wait()
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - collected for the test to judge
            errors.append(exc)
    threads = [threading.Thread(target=run, args=(fn,)) for fn in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def _quiet(fn: Callable[[], object]) -> Callable[[], None]:
    """``fn``, where a refusal (NotFound, InvalidTransition: the other delete won) is fine."""
    def run() -> None:
        try:
            fn()
        except ShoalError:
            pass
    return run


def _create_into(engine: Engine, template: str, *lists: list[str]) -> None:
    """Create a sandbox (not waiting for its agent) and note its id in each of ``lists``."""
    sid = engine.create(template).id
    for ids in lists:
        ids.append(sid)


def _append(ids: list[str], fn: Callable[[], str]) -> None:
    ids.append(fn())


@pytest.fixture
def created(engine: Engine) -> Iterator[list[str]]:
    """Ids this test created; whatever is left is deleted at the end."""
    ids: list[str] = []
    yield ids
    for sid in ids:
        try:
            engine.destroy(sid)
        except ShoalError:
            pass


def test_double_release_beside_claims_never_frees_another_sandboxs_slot(engine: Engine) -> None:
    """The network layer alone (no crun): release one id twice at once while two others claim."""
    net = engine.network
    net.ensure()
    problems: list[str] = []
    for i in range(80):
        a = f"pool-test-a{i}"
        net.claim(a)
        claimed = [f"pool-test-b{i}-{k}" for k in range(2)]
        errors = _together(partial(net.release, a), partial(net.release, a),
                           *[partial(net.claim, sid) for sid in claimed])
        assert not errors, errors
        assert net.slot_of(a) is None
        for sid in claimed:
            problems += _slot_problems(engine, sid)
            net.release(sid)
    assert problems == []


def _kill_agent(engine: Engine, sandbox_id: str) -> None:
    pid = engine.runtime.init_pid(sandbox_id)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while engine.runtime.is_alive(sandbox_id):
        assert time.monotonic() < deadline, "the agent did not die"
        time.sleep(0.01)


def test_deletes_beside_health_checks_and_creates(engine: Engine, minimal_template: str, created: list[str]) -> None:
    """Each round: a sandbox whose agent died is released by ``check_health`` and by two deletes at once,
    another is deleted, and four are created meanwhile (more than the pool holds ready); every create must
    get a whole slot of its own."""
    problems: list[str] = []
    for _ in range(10):
        dead, other = (engine.create(minimal_template, wait=True).id for _ in range(2))
        created += [dead, other]
        _kill_agent(engine, dead)
        new: list[str] = []
        make = partial(_create_into, engine, minimal_template, new, created)
        errors = _together(_quiet(engine.check_health), _quiet(partial(engine.destroy, dead)),
                           _quiet(partial(engine.destroy, dead)), _quiet(partial(engine.destroy, other)), *[make] * 4)
        assert not errors, errors
        for sid in new:
            problems += _slot_problems(engine, sid)
            assert engine.run(sid, ["true"]).exit_code == 0
            engine.destroy(sid)
    assert problems == []


RECONCILER = """
import sys, time
from pathlib import Path
from shoal.engine.engine import Engine
engine, stop = Engine(), Path(sys.argv[1])
print("ready", flush=True)
while not stop.exists():
    engine.reconcile()
"""


@pytest.fixture
def reconciler(engine: Engine, tmp_path: Path) -> Iterator[subprocess.Popen]:
    """A second process of this instance (as a CLI is beside the daemon) reconciling in a loop; it has
    its own pool too. Stopped by a file, so it exits normally and frees its pool."""
    stop = tmp_path / "stop"
    proc = subprocess.Popen([sys.executable, "-c", RECONCILER, str(stop)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=os.environ.copy())
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready", proc.stderr.read()
    try:
        yield proc
    finally:
        stop.touch()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_filesystem_pause_and_churn_beside_a_reconciling_process(engine: Engine, minimal_template: str,
                                                                 created: list[str], reconciler) -> None:
    """Creates and deletes in this process, a reconcile loop in another: the paused sandbox keeps its
    slot (same address after resume), and no create loses its slot to the other process' reconcile."""
    paused = engine.create(minimal_template, wait=True)
    created.append(paused.id)
    problems: list[str] = []
    for _ in range(6):
        engine.pause(paused.id, mode="filesystem")
        new: list[str] = []
        make = partial(_create_into, engine, minimal_template, new, created)
        errors = _together(make, make, make)
        assert not errors, errors
        for sid in new:
            problems += _slot_problems(engine, sid)
        assert not _together(*[partial(engine.destroy, sid) for sid in new])
        problems += _slot_problems(engine, paused.id)
        engine.resume(paused.id)
        assert engine.get(paused.id).address == paused.address
        assert engine.run(paused.id, ["true"]).exit_code == 0
        problems += _slot_problems(engine, paused.id)
    assert reconciler.poll() is None, reconciler.stderr.read()
    assert problems == []


def test_daemon_double_deletes_and_creates_beside_this_process(engine: Engine, minimal_template: str) -> None:
    """Through the REST API of a daemon, while this process (another of the same instance) reconciles
    and creates: concurrent creates, each sandbox deleted twice at once; every create answers 201 with a
    whole slot, every delete 204 or 404, never a 500."""
    d = start_daemon()
    try:
        with httpx.Client(base_url=d.url, headers=d.headers, timeout=60) as http:
            def create() -> str:
                r = http.post("/v1/sandboxes", json={"template": minimal_template})
                assert r.status_code == 201, r.text
                return r.json()["id"]

            def delete(sid: str) -> None:
                r = http.delete(f"/v1/sandboxes/{sid}")
                assert r.status_code in (204, 404), r.text
            problems: list[str] = []
            ids = [create() for _ in range(2)]
            for _ in range(8):
                new: list[str] = []
                local: list[str] = []
                errors = _together(*[partial(delete, sid) for sid in ids for _ in range(2)],
                                   partial(_append, new, create), partial(_append, new, create),
                                   partial(_create_into, engine, minimal_template, local, []),
                                   _quiet(engine.reconcile))
                assert not errors, errors
                for sid in new + local:
                    problems += _slot_problems(engine, sid)
                for sid in local:
                    engine.destroy(sid)
                ids = new
            for sid in ids:
                delete(sid)
            assert problems == []
    finally:
        stop_daemon(d)


def test_every_slot_is_freed_once_all_are_deleted(engine: Engine) -> None:
    """After the churn above, reconcile leaves only this process' pool: no slot is owned by a sandbox
    that is gone or by a process that is gone, and every namespace left is a slot's."""
    from shoal.net import owners

    live = {rec.id for rec in engine.store.all()}
    engine.reconcile()
    net = engine.network
    for slot, owner in net._read_slots().items():
        assert isinstance(owner, dict), (slot, owner)
        if "sandbox" in owner:
            assert owner["sandbox"] in live, (slot, owner)
        else:
            assert "pool" in owner and owners.process_alive(owner["pool"]), (slot, owner)
    assert {int(n) for n in os.listdir(net.root / "ns")} <= set(net._read_slots())
