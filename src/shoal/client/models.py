"""What the SDK hands back: sandbox info, command results and output, file entries, events."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple


def _ts(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value.replace("Z", "+00:00")) if value else None


@dataclass
class SandboxInfo:
    """A sandbox as the daemon describes it."""

    id: str
    template: str
    state: str
    cpu: float
    memory_mb: int
    disk_mb: int
    created_at: datetime | None
    expires_at: datetime | None
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, d: dict) -> SandboxInfo:
        return cls(id=d["id"], template=d["template"], state=d["state"], cpu=d["cpu"], memory_mb=d["memory_mb"],
                   disk_mb=d["disk_mb"], created_at=_ts(d.get("created_at")), expires_at=_ts(d.get("expires_at")),
                   metadata=dict(d.get("metadata") or {}))

    @property
    def sandbox_id(self) -> str:  # E2B's name for it
        return self.id


@dataclass
class CommandResult:
    """A finished command. ``stdout``/``stderr`` are text; ``*_bytes`` the raw output."""

    exit_code: int
    stdout_bytes: bytes = b""
    stderr_bytes: bytes = b""
    signal: int | None = None
    timed_out: bool = False
    pid: int = 0
    #: The daemon kept only the start of the output (16 MiB per stream by default); stream to get it all.
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    #: The sandbox's memory limit was reached and the OOM killer took this command (``signal`` is 9).
    oom_killed: bool = False

    @property
    def truncated(self) -> bool:
        return self.stdout_truncated or self.stderr_truncated

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out


class Output(NamedTuple):
    """One chunk of a process' output: ``stream`` is ``stdout``, ``stderr`` or ``pty``."""

    stream: str
    data: bytes

    @property
    def text(self) -> str:
        return self.data.decode("utf-8", "replace")


@dataclass
class ProcessInfo:
    pid: int
    cmd: str
    args: list[str]
    tag: str | None = None
    cwd: str | None = None
    pty: bool = False

    @classmethod
    def from_json(cls, d: dict) -> ProcessInfo:
        return cls(pid=d["pid"], cmd=d["cmd"], args=list(d.get("args") or []), tag=d.get("tag"), cwd=d.get("cwd"),
                   pty=bool(d.get("pty")))


@dataclass
class EntryInfo:
    """A file, directory or link inside a sandbox."""

    name: str
    path: str
    type: str
    size: int
    mode: int
    permissions: str
    owner: str
    group: str
    modified: float
    symlink_target: str | None = None

    @classmethod
    def from_json(cls, d: dict) -> EntryInfo:
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__})  # type: ignore[arg-type]

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"


@dataclass
class FilesystemEvent:
    """A change under a watched path: ``type`` is e.g. create, write, remove, rename, chmod."""

    type: str
    name: str
    path: str
