"""The writable layer (issue 10): ``disk`` (ext4 image on the host's disk) and ``ram`` (tmpfs).

A full layer gives the writer ENOSPC and the sandbox lives on; writing more than the sandbox's memory
to a ``disk`` layer works; the OOM killer takes the hog, never the agent, and the engine says so.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from shoal.engine.engine import Engine
from shoal.engine.models import SandboxEvent, SandboxState
from shoal.errors import Conflict, InvalidRequest
from shoal.storage.layers import loop_backing


def _mount_type(engine: Engine, sandbox_id: str) -> str:
    target = str(engine.runtime.bundle(sandbox_id) / "upper")
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4] == target:
                return right.split()[0]
    return ""


def test_disk_is_the_default_layer_and_ram_is_a_tmpfs(engine: Engine, new_sandbox: Callable[..., str]) -> None:
    disk = new_sandbox()
    ram = new_sandbox(layer="ram")
    assert engine.get(disk).layer == "disk" and _mount_type(engine, disk) == "ext4"
    assert engine.runtime.layers.image(disk).is_file()
    assert engine.get(ram).layer == "ram" and _mount_type(engine, ram) == "tmpfs"
    assert not engine.runtime.layers.image(ram).exists()


def test_unknown_layer_is_refused(engine: Engine, minimal_template: str) -> None:
    before = len(engine.store.all())
    with pytest.raises(InvalidRequest, match="layer"):
        engine.create(minimal_template, layer="nvme")
    assert len(engine.store.all()) == before


def test_more_than_memory_written_to_disk_layer(engine: Engine, new_sandbox: Callable[..., str]) -> None:
    """The issue's defect: 300 MiB into a 64 MiB sandbox used to be an OOM (tmpfs pages are memory)."""
    sid = new_sandbox(memory_mb=64)
    agent = engine.agent(sid)
    r = agent.run(["sh", "-c", "dd if=/dev/zero of=/tmp/big bs=1M count=300 2>&1 && ls -l /tmp/big"], timeout=120)
    assert r.exit_code == 0, (r.exit_code, r.signal, r.stdout, r.stderr)
    assert str(300 * 1024 * 1024) in r.stdout
    assert engine.runtime.usage(sid)["oom_kills"] == 0
    usage = engine.disk_usage(sid)
    assert usage is not None and usage.used >= 300 * 1024 * 1024
    assert agent.run(["true"]).exit_code == 0


def test_full_disk_layer_is_enospc_and_sandbox_lives(engine: Engine, new_sandbox: Callable[..., str]) -> None:
    sid = new_sandbox(disk_mb=64)
    agent = engine.agent(sid)
    agent.run(["sh", "-c", "echo keep > /keep"])
    r = agent.run(["sh", "-c", "dd if=/dev/zero of=/tmp/fill bs=1M count=200"], timeout=120)
    assert r.exit_code != 0 and r.signal is None
    assert "No space left on device" in r.stderr
    usage = engine.disk_usage(sid)
    assert usage is not None and usage.total <= 64 * 1024 * 1024 and usage.total - usage.used < 4 * 1024 * 1024
    assert engine.get(sid).state is SandboxState.RUNNING
    again = agent.run(["sh", "-c", "rm /tmp/fill && echo more > /tmp/more && cat /keep /tmp/more"])
    assert again.exit_code == 0 and again.stdout == "keep\nmore\n"


def test_oom_kills_the_hog_not_the_agent_and_is_an_event(engine: Engine, new_sandbox: Callable[..., str]) -> None:
    sid = new_sandbox(memory_mb=64)
    events: list[dict] = []
    unsubscribe = engine.subscribe(events.append)
    try:
        engine.check_health()  # the baseline: no kill yet
        hog = engine.agent(sid).run(["sh", "-c", "x=0123456789; while :; do x=$x$x; done"], timeout=120)
        assert hog.signal == 9 and hog.exit_code == 137
        assert engine.runtime.is_alive(sid)
        assert engine.agent(sid).run(["echo", "alive"]).stdout == "alive\n"
        engine.check_health()
    finally:
        unsubscribe()
    ooms = [e for e in events if e["type"] == SandboxEvent.OOM.value and e["sandbox"]["id"] == sid]
    assert len(ooms) == 1 and ooms[0]["oom_kills"] >= 1
    assert engine.get(sid).state is SandboxState.RUNNING


def test_ram_layer_cannot_pause_to_filesystem(engine: Engine, new_sandbox: Callable[..., str]) -> None:
    sid = new_sandbox(layer="ram")
    with pytest.raises(Conflict, match="memory"):
        engine.pause(sid, mode="filesystem")
    rec = engine.get(sid)
    assert rec.state is SandboxState.RUNNING and rec.pause_mode is None
    assert engine.agent(sid).run(["true"]).exit_code == 0


def test_destroy_removes_the_layer_image(engine: Engine, minimal_template: str,
                                         leftovers: Callable[..., list[str]]) -> None:
    rec = engine.create(minimal_template, wait=True)
    image = engine.runtime.layers.image(rec.id)
    assert image.is_file()
    engine.destroy(rec.id)
    assert not image.exists()
    assert leftovers(rec.id) == []
    assert loop_backing(image) == []
