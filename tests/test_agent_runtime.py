"""The agent runtime (``runtime/agent_runtime.py``): which interpreter PID 1 runs on, and what it holds.

The agent's start is on every create's path, so the runtime prefers an interpreter that links
libpython statically (a distribution's ``/usr/bin/python3.X``) over a shared-libpython build such as
pyenv's, and the sandbox sees only that interpreter, its libraries and the agent's modules.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from shoal.runtime import agent_runtime


def test_the_agent_runs_on_a_static_interpreter_when_the_host_has_one(engine, agent):
    """This host's distribution has ``/usr/bin/python3.X`` of the daemon's version (``scripts/install.sh``
    installs it): the agent runs on it even though the daemon's venv may be a shared-libpython build."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = Path("/usr/bin") / version
    if not system.exists() or agent_runtime._links_libpython(system):
        pytest.skip(f"no statically linked {system} on this host")
    chosen = agent_runtime.agent_python()
    assert not agent_runtime._links_libpython(chosen), chosen
    runtime = engine.runtime.runtime_dir()
    assert not list((runtime / "lib").glob("libpython*")), sorted(p.name for p in (runtime / "lib").iterdir())
    r = agent.run(["/.shoal/lib/ld.so", "--library-path", "/.shoal/lib", f"/.shoal/python/bin/{version}", "-S",
                   "-I", "-c", "import sys; print(sys.version_info[:2])"])
    assert r.exit_code == 0 and r.stdout.strip() == str(tuple(sys.version_info[:2])), r.stderr


def test_an_operator_can_name_the_agent_interpreter(monkeypatch):
    """``SHOAL_AGENT_PYTHON`` overrides the choice (and names the runtime's digest, so a change rebuilds it)."""
    agent_runtime.agent_python.cache_clear()
    try:
        monkeypatch.setenv("SHOAL_AGENT_PYTHON", sys.executable)
        assert agent_runtime.agent_python() == Path(sys.executable).resolve()
        first = agent_runtime._digest()
        agent_runtime.agent_python.cache_clear()
        monkeypatch.delenv("SHOAL_AGENT_PYTHON")
        if agent_runtime.agent_python() != Path(sys.executable).resolve():
            assert agent_runtime._digest() != first
    finally:
        agent_runtime.agent_python.cache_clear()


def test_concurrent_first_creates_build_one_complete_runtime(tmp_path):
    """The daemon creates sandboxes on several threads: the first creates after an upgrade all find no
    runtime and build it at once. Two builders in one process once shared a temporary directory, and a
    runtime marked ready but without its ``lib/`` (no ``ld.so``: every sandbox failed) was the result."""
    import threading

    from shoal.settings import Settings

    settings = Settings(state_dir=tmp_path / "state", run_dir=tmp_path / "run")
    results: list[object] = []

    def build() -> None:
        try:
            results.append(agent_runtime.ensure(settings))
        except Exception as exc:  # noqa: BLE001 - reported below
            results.append(exc)
    threads = [threading.Thread(target=build) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(set(map(str, results))) == 1 and isinstance(results[0], Path), results
    root = results[0]
    assert agent_runtime._complete(root)
    assert (root / "lib" / "ld.so").is_file() and not list(root.parent.glob(".build-*"))


def test_an_incomplete_runtime_is_built_again(tmp_path):
    """A runtime left marked ready but incomplete (by that race, or a disk that filled) is rebuilt, not used."""
    import shutil

    from shoal.settings import Settings

    settings = Settings(state_dir=tmp_path / "state", run_dir=tmp_path / "run")
    root = agent_runtime.ensure(settings)
    shutil.rmtree(root / "lib")
    assert (root / "READY").exists() and not agent_runtime._complete(root)
    assert agent_runtime.ensure(settings) == root
    assert (root / "lib" / "ld.so").is_file()


def test_reconcile_removes_the_runtimes_an_upgrade_left(engine, agent):
    """Each new interpreter or agent version builds a new runtime; reconcile removes the old ones, on disk
    and their tmpfs mounts, and leaves the current one (and the sandboxes running on it) alone."""
    from shoal.runtime.linux import mounts

    current = engine.runtime.runtime_dir()
    old_disk = engine.settings.agent_runtime_dir / "0ld0ld0ld0ld0ld0"
    (old_disk / "lib").mkdir(parents=True)
    (old_disk / "READY").write_text("old\n")
    old_mount = current.parent / "0ld0ld0ld0ld0ld0"
    old_mount.mkdir()
    mounts.mount("shoal-agent-runtime", old_mount, "tmpfs", mounts.MS_NOSUID | mounts.MS_NODEV, "size=1m")
    try:
        engine.reconcile()
        assert not old_disk.exists() and not old_mount.exists()
        assert agent_runtime._complete(current) and mounts.is_mounted(current)
        assert agent.run(["true"]).exit_code == 0
    finally:
        if old_mount.exists():
            mounts.umount(old_mount)
            old_mount.rmdir()
