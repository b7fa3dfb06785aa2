"""The agent runtime (``runtime/agent_runtime.py``): which interpreter PID 1 runs on, and what it holds.

The agent's start is on every create's path, so the runtime prefers an interpreter that links
libpython statically (a distribution's ``/usr/bin/python3.X``) over a shared-libpython build such as
pyenv's, and the sandbox sees only that interpreter, its libraries and the agent's modules.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from shoal.runtime import agent_runtime


def _links_libpython(binary: Path) -> bool:
    return "libpython" in subprocess.run(["ldd", str(binary)], capture_output=True, text=True).stdout


def test_the_agent_runs_on_a_static_interpreter_when_the_host_has_one(engine, agent):
    """This host's distribution has ``/usr/bin/python3.X`` of the daemon's version (``scripts/install.sh``
    installs it): the agent runs on it even though the daemon's venv may be a shared-libpython build."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = Path("/usr/bin") / version
    if not system.exists() or _links_libpython(system):
        pytest.skip(f"no statically linked {system} on this host")
    chosen = agent_runtime.agent_python()
    assert not _links_libpython(chosen), chosen
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
