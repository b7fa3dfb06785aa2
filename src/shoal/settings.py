"""One place for where Shoal keeps things on the host and how sandboxes are mapped.

Each value comes from an environment variable if set, else a default (flag → env → default is
applied by the CLI and daemon on top of this).
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_STATE_DIR = "/var/lib/shoal"
DEFAULT_RUN_DIR = "/run/shoal"
#: The instance that uses the default state directory: the one a user's ``shoal`` talks to.
MAIN_INSTANCE = "main"
_INSTANCE_RE = re.compile(r"[a-z0-9]{1,16}")


def _env_path(name: str, default: str) -> Path:
    return Path(os.environ.get(name) or default)


def instance_for(state_dir: Path) -> str:
    """The instance name of a state directory: ``main`` for the default one, else a short hash of its path.

    Two Shoal instances on one host (a user's daemon and a test run, say) must never touch each other's
    host resources; each resource name carries the instance, and each instance reconciles only its own.
    Deriving the name from the state directory means two setups that keep state apart are kept apart on
    the host too, with nothing to configure.
    """
    if os.environ.get("SHOAL_INSTANCE"):
        name = os.environ["SHOAL_INSTANCE"]
        if not _INSTANCE_RE.fullmatch(name):
            raise ValueError(f"SHOAL_INSTANCE must be 1-16 lowercase letters or digits, not {name!r}")
        return name
    resolved = os.path.realpath(state_dir)
    if resolved == DEFAULT_STATE_DIR:
        return MAIN_INSTANCE
    return "i" + hashlib.sha256(resolved.encode()).hexdigest()[:7]


@dataclass(frozen=True)
class Settings:
    """Host paths and identity mapping shared by every Shoal component."""

    #: Persistent state: template images, the sandbox store, the agent runtime.
    state_dir: Path = field(default_factory=lambda: _env_path("SHOAL_STATE_DIR", DEFAULT_STATE_DIR))
    #: Volatile state: mounts, bundles, sockets, crun's state; gone after a reboot, like the sandboxes.
    run_dir: Path = field(default_factory=lambda: _env_path("SHOAL_RUN_DIR", DEFAULT_RUN_DIR))
    #: Host uid/gid that sandbox root maps to, and how many ids each sandbox gets.
    uid_base: int = 100000
    uid_count: int = 65536
    #: Names this instance's host resources (``shoal-<instance>-<sandbox>``); see ``instance_for``.
    instance: str = ""

    def __post_init__(self) -> None:
        if not self.instance:
            object.__setattr__(self, "instance", instance_for(self.state_dir))

    @property
    def resource_prefix(self) -> str:
        """Every host resource of this instance (cgroup, crun container) starts with this."""
        return f"shoal-{self.instance}-"

    def resource_name(self, sandbox_id: str) -> str:
        return self.resource_prefix + sandbox_id

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
