"""One place for where Shoal keeps things on the host and how sandboxes are mapped.

Each value comes from an environment variable if set, else a default (flag → env → default is
applied by the CLI and daemon on top of this).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


def _env_path(name: str, default: str) -> Path:
    return Path(os.environ.get(name) or default)


@dataclass(frozen=True)
class Settings:
    """Host paths and identity mapping shared by every Shoal component."""

    #: Persistent state: template images, the sandbox store, the agent runtime.
    state_dir: Path = field(default_factory=lambda: _env_path("SHOAL_STATE_DIR", "/var/lib/shoal"))
    #: Volatile state: mounts, bundles, sockets, crun's state; gone after a reboot, like the sandboxes.
    run_dir: Path = field(default_factory=lambda: _env_path("SHOAL_RUN_DIR", "/run/shoal"))
    #: Host uid/gid that sandbox root maps to, and how many ids each sandbox gets.
    uid_base: int = 100000
    uid_count: int = 65536

    @property
    def templates_dir(self) -> Path:
        return self.state_dir / "templates"

    @property
    def template_mounts_dir(self) -> Path:
        return self.run_dir / "templates"

    @property
    def sandboxes_dir(self) -> Path:
        return self.run_dir / "sandboxes"

    @property
    def crun_root(self) -> Path:
        return self.run_dir / "crun"

    @property
    def agent_runtime_dir(self) -> Path:
        return self.state_dir / "agent-runtime"

    @property
    def db_path(self) -> Path:
        return self.state_dir / "shoal.db"
