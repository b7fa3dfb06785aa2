"""What a create takes ready-made (issue 7's "no regression in create"): ``disk`` layers mounted ahead of
time (``storage/ready_layers.py``) and user namespaces made by a small helper process
(``runtime/linux/userns_maker.py``), and what a dead process's pools leave is swept by reconcile.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

from shoal.engine.engine import Engine
from shoal.runtime.linux import mounts


def _wait(cond: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def _ready_mounts(engine: Engine) -> dict[str, int]:
    """Ready layers of this process that are mounted: name → inode of their image."""
    ready = engine.runtime.layers.ready
    found = {}
    for name in os.listdir(ready.mount_dir) if ready.mount_dir.is_dir() else []:
        if mounts.is_mounted(ready.mount_dir / name) and ready.image(name).exists():
            found[name] = ready.image(name).stat().st_ino
    return found


def test_a_create_takes_a_layer_mounted_ahead_of_time(engine: Engine, new_sandbox: Callable[..., str]) -> None:
    first = new_sandbox()  # asks for the default size: the pool fills behind it
    _wait(lambda: len(_ready_mounts(engine)) >= 1, "a ready layer")
    before = _ready_mounts(engine)
    sid = new_sandbox()
    image = engine.runtime.layers.image(sid)
    assert image.stat().st_ino in before.values(), "the create mounted a layer of its own"
    # the sandbox has the whole layer: it writes, its files are its own, the ready name is gone
    assert engine.agent(sid).run(["sh", "-c", "echo hi > /root/f && cat /root/f"]).stdout == "hi\n"
    assert engine.agent(first).run(["cat", "/root/f"]).exit_code != 0
    taken = [n for n, ino in before.items() if ino == image.stat().st_ino][0]
    assert not engine.runtime.layers.ready.image(taken).exists()
    assert not (engine.runtime.layers.ready.mount_dir / taken).exists()


def test_user_namespaces_are_made_outside_the_creating_process(engine: Engine,
                                                                  new_sandbox: Callable[..., str]) -> None:
    new_sandbox()
    pool = engine.runtime.userns_pool
    _wait(lambda: len(pool._ready) >= 1, "a ready user namespace")
    maker = pool._maker._proc
    assert maker is not None and maker.poll() is None
    assert maker.pid != os.getpid()
    # a namespace it made is named after this process (so sweep finds what a dead daemon left)
    assert all(p.name.startswith(pool._me + "-") for p in pool._ready)


def test_pools_of_a_killed_process_are_swept(engine: Engine, minimal_template: str) -> None:
    """A creator SIGKILLed with layers and namespaces ready leaves mounts and images; reconcile removes them."""
    script = textwrap.dedent(f"""
        import sys, time
        from shoal.engine.engine import Engine
        e = Engine()
        rec = e.create({minimal_template!r})
        e.destroy(rec.id)
        r = e.runtime
        deadline = time.monotonic() + 60
        from shoal.storage import ready_layers
        while (len(r.layers.ready._ready.get(1024, ())) < ready_layers.READY  # full: no layer half-made
               or len(r.userns_pool._ready) < r.userns_pool.size):
            if time.monotonic() > deadline:
                sys.exit(3)
            time.sleep(0.02)
        print("ready", flush=True)
        time.sleep(600)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        prefix = f"{proc.pid}-"
        ready = engine.runtime.layers.ready
        theirs = [n for n in os.listdir(ready.mount_dir) if n.startswith(prefix)]
        assert theirs and all(mounts.is_mounted(ready.mount_dir / n) for n in theirs)
        userns_dir = engine.runtime.userns_pool.directory
        assert any(n.startswith(prefix) for n in os.listdir(userns_dir))
    finally:
        proc.send_signal(signal.SIGKILL)  # our own child, by pid
        proc.wait()
    engine.reconcile()
    assert not any(n.startswith(prefix) for n in os.listdir(ready.mount_dir))
    assert not [p for p in Path(ready.image_dir).iterdir() if p.name.startswith(f".ready-{prefix}")]
    assert not any(n.startswith(prefix) for n in os.listdir(userns_dir))
    assert not [m for m in mounts.mounts_under(ready.mount_dir) if m.name.startswith(prefix)]
