"""Two Shoal instances on one host never touch each other's sandboxes (issue 7, item 9).

A second instance (another state and run directory, as a test run beside a user's daemon) reconciles at
start-up; it must find only its own resources. A run directory belongs to one instance.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import httpx
import pytest

from conftest import DAEMON_BIN, free_port
from shoal.engine.engine import Engine
from shoal.errors import Conflict
from shoal.runtime.linux import cgroups, mounts
from shoal.settings import Settings


@pytest.fixture
def other_dirs():
    """State and run directories of a second instance; everything it made is removed afterwards."""
    root = Path(tempfile.mkdtemp(prefix="shoal-other-", dir="/var/tmp"))
    os.chmod(root, 0o711)
    try:
        yield root / "state", root / "run"
    finally:
        from shoal.net.network import Network
        instance = Settings(state_dir=root / "state", run_dir=root / "run").instance
        net = Network._instances.get(instance)  # the pool an Engine of that instance made in this process
        if net is not None:
            net.close()
        mounts.umount_tree(root)
        shutil.rmtree(root, ignore_errors=True)


def test_instance_names_differ_by_state_dir(engine, other_dirs):
    state, run = other_dirs
    other = Settings(state_dir=state, run_dir=run)
    assert other.instance != engine.settings.instance
    assert Settings(state_dir=Path("/var/lib/shoal")).instance == "main"
    assert engine.runtime.container("abc").startswith(f"shoal-{engine.settings.instance}-")


def test_another_instances_reconcile_spares_our_sandboxes(engine, new_sandbox, other_dirs):
    sid = new_sandbox()
    init = engine.runtime.init_pid(sid)
    state, run = other_dirs
    other = Engine(Settings(state_dir=state, run_dir=run))
    assert sid not in other.runtime.existing()
    assert sid not in other.reconcile()
    assert engine.runtime.is_alive(sid) and init in cgroups.pids(engine.runtime.container(sid))
    assert engine.agent(sid).run(["echo", "alive"]).stdout == "alive\n"


def test_another_daemon_starting_spares_our_sandboxes(engine, new_sandbox, other_dirs):
    """The reported case: `shoal serve` with another SHOAL_STATE_DIR/SHOAL_RUN_DIR killed every sandbox."""
    sid = new_sandbox()
    state, run = other_dirs
    port = free_port()
    env = {**os.environ, "SHOAL_STATE_DIR": str(state), "SHOAL_RUN_DIR": str(run)}
    log = state.parent / "daemon.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([DAEMON_BIN, "serve", "--port", str(port)], env=env, stdout=out, stderr=out)
    try:
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5)
        for _ in range(600):
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            import time
            time.sleep(0.05)
        else:
            pytest.fail("the other daemon never answered /health")
        assert '"reconciled"' in log.read_text()  # its start-up reconcile has run
        assert engine.runtime.is_alive(sid)
        assert engine.agent(sid).run(["echo", "alive"]).stdout == "alive\n"
    finally:
        proc.terminate()
        proc.wait(20)
        from shoal.runtime.linux import mounts
        mounts.umount_tree(state.parent)


def test_a_run_dir_belongs_to_one_instance(engine, other_dirs):
    state, _ = other_dirs
    with pytest.raises(Conflict, match="belongs to Shoal instance"):
        Engine(Settings(state_dir=state, run_dir=engine.settings.run_dir))
