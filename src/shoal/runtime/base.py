"""What every runtime (``linux`` today, ``microvm`` later) offers the engine.

The engine only ever talks to a ``Runtime``; a runtime turns a ``SandboxSpec`` into an isolated
machine whose agent answers on ``agent_socket``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class SandboxSpec:
    """Everything a runtime needs to bring one sandbox up."""

    sandbox_id: str
    template: str
    #: Host directory holding the template's mounted read-only image.
    lower_dir: Path
    cpu: float = 1.0
    memory_mb: int = 512
    disk_mb: int = 1024
    pids_limit: int = 1024
    env: dict[str, str] = field(default_factory=dict)
    #: The writable layer: ``disk`` (an image on the host's disk) or ``ram`` (tmpfs, counted as memory).
    layer: str = "disk"
    #: Start again from the files the sandbox already has (after ``stop``), instead of an empty layer.
    keep_files: bool = False
    #: A network namespace to join (``shoal.net``) and the sysfs mounted for it; None: a new empty one.
    netns: str | None = None
    sysfs: str | None = None
    #: Files written into the writable layer's ``/etc`` (``resolv.conf``, a CA bundle), owned by sandbox root.
    etc_files: dict[str, str] = field(default_factory=dict)
    #: Volumes bind-mounted in: (host mount of the volume, path inside, read-only), see ``engine/volumes.py``.
    volumes: tuple[tuple[str, str, bool], ...] = ()
    #: Read-only layers stacked above ``lower_dir``, top first (mounted snapshots, ``engine/snapshots.py``).
    lower_layers: tuple[Path, ...] = ()
    #: What ``/proc/sys/kernel/random/boot_id`` says inside: the sandbox's own, new at every start (a
    #: filesystem-only resume is a new boot, as E2B's SDK checks), never the host's.
    boot_id: str = ""


@dataclass(frozen=True)
class Capabilities:
    """What a runtime can keep across pause/snapshot; reported through the API."""

    freeze: bool = True
    memory_snapshot: bool = False
    filesystem_snapshot: bool = True


class Runtime(Protocol):
    name: str
    capabilities: Capabilities

    def create(self, spec: SandboxSpec) -> Path:
        """Bring the sandbox up; return the host path of its agent socket."""

    def destroy(self, sandbox_id: str, keep_files: bool = False) -> None:
        """Free every host resource of the sandbox (but its files, with ``keep_files``); a no-op for one
        that is already gone."""

    def agent_socket(self, sandbox_id: str) -> Path:
        """Where the sandbox's agent listens (on the host)."""

    def is_alive(self, sandbox_id: str) -> bool:
        """True if the sandbox's init (the agent) still runs."""

    def existing(self) -> set[str]:
        """Ids of every sandbox this runtime has anything of on the host (for reconciliation)."""

    def usage(self, sandbox_id: str) -> dict[str, int | None]:
        """Memory bytes, CPU microseconds, task count."""

    def oom_kills(self, sandbox_id: str) -> int | None:
        """The OOM killer's kills in the sandbox so far (None if unknown): an exec killed by SIGKILL while
        this grew was an OOM victim, and its result says so."""

    def pause(self, sandbox_id: str) -> None:
        """Stop every process of the sandbox from running; memory is kept."""

    def resume(self, sandbox_id: str) -> None:
        """Undo ``pause``."""

    def stop(self, sandbox_id: str) -> None:
        """Stop every process and free the sandbox's memory; its files stay (``Conflict`` if they cannot)."""

    def has_files(self, sandbox_id: str) -> bool:
        """True if the sandbox's files are kept on the host (it can start again from them)."""

    def pools_full(self) -> bool:
        """Whether everything this process keeps ready for creates is made."""
        return True

    def close_pools(self) -> None:
        """Free whatever this process keeps ready for creates."""

    def has_leftovers(self, sandbox_id: str) -> bool:
        """True if anything of a stopped sandbox but its kept files is on the host."""
        return True

    def prune(self) -> None:
        """Remove host state an upgrade left behind (reconcile calls it)."""

    def disk_usage(self, sandbox_id: str) -> object | None:
        """Used/total bytes of the mounted writable layer (``.used``, ``.total``), or ``None``."""
