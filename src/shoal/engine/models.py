"""The engine's vocabulary: sandbox states, the moves between them, and the sandbox record."""

from __future__ import annotations

import enum
import re
import secrets
import string
from dataclasses import asdict, dataclass, field


class PauseMode(str, enum.Enum):
    """What a paused sandbox keeps. ``memory``: every process is frozen, RAM stays charged, resume thaws
    them. ``filesystem``: every process is stopped and its RAM freed; only the files (the ``disk`` layer)
    stay, and resume starts the sandbox again from them (a new ``boot_id``)."""

    MEMORY = "memory"
    FILESYSTEM = "filesystem"


class SandboxState(str, enum.Enum):
    CREATING = "creating"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPING = "stopping"
    DELETED = "deleted"
    ERROR = "error"


class SandboxEvent(str, enum.Enum):
    """Lifecycle events, each emitted by the engine where it happens (``Engine.subscribe``, ``/v1/events``).

    ``created`` a sandbox runs · ``paused`` / ``resumed`` frozen / thawed · ``timeout`` its expiry moved ·
    ``expired`` its timeout passed (``deleted`` follows) · ``died`` its agent (PID 1) is gone while it
    should run: a ``disk`` sandbox is paused to its filesystem (resume restarts it with its files), a
    ``ram`` one moved to ``error``, both with a ``reason`` · ``oom`` the out-of-memory killer
    killed a process in it (the event carries ``oom_kills``, the sandbox's total so far); it still runs ·
    ``deleted`` gone for good.
    """

    CREATED = "created"
    PAUSED = "paused"
    RESUMED = "resumed"
    TIMEOUT = "timeout"
    EXPIRED = "expired"
    DIED = "died"
    OOM = "oom"
    DELETED = "deleted"


#: Every legal move; anything else is an ``InvalidTransition`` (HTTP 409).
TRANSITIONS: dict[SandboxState, frozenset[SandboxState]] = {
    SandboxState.CREATING: frozenset({SandboxState.RUNNING, SandboxState.ERROR, SandboxState.STOPPING}),
    SandboxState.RUNNING: frozenset({SandboxState.PAUSED, SandboxState.STOPPING, SandboxState.ERROR}),
    SandboxState.PAUSED: frozenset({SandboxState.RUNNING, SandboxState.STOPPING, SandboxState.ERROR}),
    SandboxState.STOPPING: frozenset({SandboxState.DELETED, SandboxState.ERROR}),
    SandboxState.ERROR: frozenset({SandboxState.STOPPING}),
    SandboxState.DELETED: frozenset(),
}

_ID_ALPHABET = string.ascii_lowercase + string.digits


def new_sandbox_id() -> str:
    """12 characters, starting with a letter: short enough for a hostname and a veth name."""
    return secrets.choice(string.ascii_lowercase) + "".join(secrets.choice(_ID_ALPHABET) for _ in range(11))


_VALID_ID = re.compile(r"[a-z][a-z0-9]{0,31}")


def valid_sandbox_id(value: str) -> bool:
    """1-32 lowercase letters and digits, a letter first (one regex match: on every request's path)."""
    return _VALID_ID.fullmatch(value) is not None


@dataclass
class SandboxRecord:
    """What the store keeps about one sandbox."""

    id: str
    template: str
    state: SandboxState
    cpu: float
    memory_mb: int
    disk_mb: int
    created_at: float
    runtime: str = "linux"
    env: dict[str, str] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    #: The process that owns an ephemeral sandbox (``shoal run``); it is reaped when that dies.
    owner_pid: int | None = None
    owner_start: int | None = None
    expires_at: float | None = None
    api_key: str | None = None
    #: Why the sandbox is in ``error`` (e.g. its agent died, and whether the OOM killer did it), or why
    #: the host paused it (its processes were gone after a host restart; its files were kept).
    reason: str | None = None
    #: The writable layer: ``disk`` (an image on the host's disk) or ``ram`` (tmpfs, counted as memory).
    layer: str = "disk"
    #: While ``paused``: what the pause kept (``PauseMode``).
    pause_mode: str | None = None
    #: When its processes last started (create, or resume from the filesystem), and an id for that boot.
    started_at: float | None = None
    boot_id: str | None = None
    #: Its network (``shoal.net``): IPv4 and IPv6 address, and whether it may reach the internet;
    #: None when it has no interface but loopback.
    address: str | None = None
    address6: str | None = None
    internet: bool | None = None
    #: Private networks it joined at create (names, of its API key's networks) and its DNS name in them
    #: (``engine/networks.py``).
    networks: list[str] = field(default_factory=list)
    name: str | None = None
    #: Volumes it mounts (``engine/volumes.py``): ``[{id, name, path, read_only}]``, fixed at create.
    volumes: list[dict] = field(default_factory=list)
    #: Seconds without traffic before it goes to standby by itself (``engine/standby.py``); None: the
    #: daemon's ``SHOAL_STANDBY_AFTER``; 0: never.
    standby_after: float | None = None
    #: The snapshot its files start from (``engine/snapshots.py``); None: its template alone.
    snapshot: str | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["state"] = self.state.value
        return d
