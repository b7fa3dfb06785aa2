"""Request and response bodies of the native API (they are the OpenAPI schema)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, field_validator

from shoal.engine.limits import LIMITS
from shoal.engine.models import SandboxRecord
from shoal.engine.text import clean_text

#: Every user string of a request body: text a process, a file name or the store can hold.
Text = Annotated[str, AfterValidator(clean_text)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VolumeMount(Strict):
    name: Text = Field(..., min_length=1, max_length=63)
    path: Text = Field(..., min_length=2, max_length=1024, description="Absolute path inside the sandbox (not "
                       "/, /proc, /sys, /dev, /.shoal or under them).")
    read_only: bool = False


class VolumeCreate(Strict):
    name: Text = Field(..., min_length=1, max_length=63, description="Unique per API key: letters, digits, . _ -")
    size_mb: int = Field(1024, ge=16, le=1024 * 1024, description="The kernel enforces it: full is ENOSPC.")


class Volume(BaseModel):
    id: str
    name: str
    size_mb: int
    created_at: datetime
    sandboxes: list[str] = Field(default_factory=list, description="Sandboxes that mount it (rm is refused "
                                 "while any do).")
    used_bytes: int | None = Field(None, description="Bytes used, while some sandbox has it mounted.")
    total_bytes: int | None = None

    @classmethod
    def of(cls, info: dict) -> Volume:
        return cls(**{**info, "created_at": datetime.fromtimestamp(info["created_at"], UTC)})


class SandboxCreate(Strict):
    template: Text = Field("minimal", min_length=1, max_length=128)
    cpu: float = Field(1.0, ge=LIMITS.cpu.low, le=LIMITS.cpu.high)
    memory_mb: int = Field(512, ge=LIMITS.memory_mb.low, le=LIMITS.memory_mb.high)
    disk_mb: int = Field(1024, ge=LIMITS.disk_mb.low, le=LIMITS.disk_mb.high)
    timeout: int = Field(300, ge=LIMITS.timeout.low, le=LIMITS.timeout.high,
                         description="Seconds until the sandbox is deleted.")
    env: dict[Text, Text] = Field(default_factory=dict)
    metadata: dict[Text, Text] = Field(default_factory=dict)
    public_traffic: bool = Field(False, description="Every port is reachable through the port proxy without "
                                 "credentials. Default: only with the owner's key or the traffic token.")
    public_ports: list[StrictInt] = Field(default_factory=list, max_length=64,
                                          description="Ports reachable without credentials (the others stay private).")
    layer: Literal["disk", "ram"] = Field("disk", description="The writable layer: disk (on the host's disk, "
                                          "survives restarts; full is ENOSPC) or ram (tmpfs, counted as memory).")
    internet: bool | None = Field(None, description="false: the sandbox reaches nothing past the host (it keeps "
                                  "its address and DNS). Default: the daemon's SHOAL_INTERNET (on).")
    egress: dict[str, Any] | None = Field(None, description="Egress policy: allow_out (CIDRs, IPs, domains, "
                                          "*.wildcards), deny_out (CIDRs, IPs), rules ({domain: [{transform: "
                                          "{headers}}]}, plain HTTP); an allow beats a deny. See docs/networking.md.")
    net_limits: dict[str, Any] | None = Field(None, description="egress_mbit, ingress_mbit (default unlimited), "
                                              "max_connections (default 1024) outbound at once.")
    networks: list[Text] = Field(default_factory=list, max_length=8, description="Private networks (of this key) "
                                 "to join: members reach each other by address and by name.")
    name: Text | None = Field(None, max_length=32, description="Its DNS name in its private networks "
                              "(<name>.shoal.internal; <id>.shoal.internal always works).")
    volumes: list[VolumeMount] = Field(default_factory=list, max_length=16,
                                       description="Volumes of this key mounted into the sandbox (POST /v1/volumes).")
    standby_after: float | None = Field(None, ge=0, le=LIMITS.timeout.high, description="Seconds without "
                                        "traffic before it freezes itself (the next request wakes it); 0: never. "
                                        "Default: the daemon's SHOAL_STANDBY_AFTER (0).")
    snapshot: Text | None = Field(None, min_length=1, max_length=64, description="Start from this snapshot's "
                                  "files (id or name, POST /v1/sandboxes/{id}/snapshots); its template is used, "
                                  "`template` is ignored.")

    @field_validator("public_ports")
    @classmethod
    def _ports(cls, value: list[int]) -> list[int]:
        return _port_list(value)


class NetworkUpdate(Strict):
    """Which ports of a sandbox the port proxy serves without credentials (replaces the current setting)."""

    public_traffic: bool = False
    public_ports: list[StrictInt] = Field(default_factory=list, max_length=64)

    @field_validator("public_ports")
    @classmethod
    def _ports(cls, value: list[int]) -> list[int]:
        return _port_list(value)


def _port_list(value: list[int]) -> list[int]:
    for port in value:
        if not 0 < port < 65536:
            raise ValueError(f"invalid port {port}: must be 1-65535")
    return sorted(set(value))


class Sandbox(BaseModel):
    id: str
    template: str
    state: Literal["creating", "running", "paused", "stopping", "deleted", "error"]
    cpu: float
    memory_mb: int
    disk_mb: int
    created_at: datetime
    expires_at: datetime | None
    metadata: dict[str, str]
    public_traffic: bool = False
    public_ports: list[int] = Field(default_factory=list)
    traffic_access_token: str | None = Field(None, description="Opens the sandbox's private ports "
                                             "(header e2b-traffic-access-token); shown to the owner only.")
    reason: str | None = Field(None, description="Why the sandbox is in state error (e.g. its agent died), or "
                               "why the host paused it.")
    layer: Literal["disk", "ram"] = "disk"
    pause_mode: Literal["memory", "filesystem"] | None = Field(
        None, description="While paused: memory (processes frozen, RAM kept) or filesystem (processes stopped, "
        "RAM freed, files kept; resume starts it again with a new boot_id).")
    started_at: datetime | None = Field(None, description="When its processes last started (create or resume "
                                        "from the filesystem).")
    boot_id: str | None = Field(None, description="Changes each time its processes start again.")
    address: str | None = Field(None, description="Its IPv4 address (null: loopback only).")
    address6: str | None = Field(None, description="Its IPv6 address.")
    internet: bool | None = Field(None, description="Whether it may reach past the host.")
    networks: list[str] = Field(default_factory=list, description="Private networks it is a member of.")
    name: str | None = Field(None, description="Its DNS name in its private networks.")
    disk_used_bytes: int | None = Field(None, description="Bytes used in the writable layer (while mounted; "
                                        "GET /v1/sandboxes/{id} only).")
    disk_total_bytes: int | None = Field(None, description="Size of the writable layer (the same).")
    volumes: list[dict] = Field(default_factory=list, description="Mounted volumes: {id, name, path, read_only}.")
    standby_after: float | None = Field(None, description="Idle seconds before standby (null: the daemon's).")
    snapshot: str | None = Field(None, description="The snapshot its files started from (null: its template).")

    @classmethod
    def of(cls, rec: SandboxRecord, disk: object | None = None) -> Sandbox:
        """The API's view of ``rec``; ``disk`` (``storage.layers.DiskUsage``) adds the layer's usage."""
        def ts(value: float | None) -> datetime | None:
            return datetime.fromtimestamp(value, UTC) if value is not None else None
        return cls(id=rec.id, template=rec.template, state=rec.state.value, cpu=rec.cpu, memory_mb=rec.memory_mb,
                   disk_mb=rec.disk_mb, created_at=ts(rec.created_at), expires_at=ts(rec.expires_at),
                   metadata=rec.metadata, reason=rec.reason, layer=rec.layer, pause_mode=rec.pause_mode,
                   started_at=ts(rec.started_at), boot_id=rec.boot_id, address=rec.address, address6=rec.address6,
                   networks=rec.networks, name=rec.name,
                   internet=rec.internet, volumes=rec.volumes, standby_after=rec.standby_after,
                   snapshot=rec.snapshot,
                   disk_used_bytes=getattr(disk, "used", None), disk_total_bytes=getattr(disk, "total", None))


class PauseRequest(Strict):
    mode: Literal["memory", "filesystem"] = Field(
        "memory", description="memory: freeze every process (RAM kept). filesystem: stop every process and free "
        "its RAM, keeping the files on disk (layer disk only); resume starts it again from them.")


class TimeoutUpdate(Strict):
    timeout: int = Field(..., ge=LIMITS.timeout.low, le=LIMITS.timeout.high)


class ExecRequest(Strict):
    cmd: list[Text] | Text = Field(..., description="argv, or a string run by /bin/sh -c.")
    env: dict[Text, Text] = Field(default_factory=dict)
    cwd: Text | None = Field(None, max_length=4096)
    user: Text | None = Field(None, max_length=256)
    timeout: float | None = Field(None, gt=0, le=LIMITS.timeout.high)
    stdin: Text | None = Field(None, description="Text fed to stdin, then closed.")
    stdin_open: bool = Field(False, description="Keep stdin open (write later via /processes/{pid}/stdin).")
    background: bool = Field(False, description="Return the pid at once; the process keeps running.")
    stream: bool = Field(False, description="Stream events as NDJSON (or SSE with Accept: text/event-stream).")
    tag: Text | None = Field(None, max_length=256)

    def argv(self) -> list[str]:
        return ["/bin/sh", "-c", self.cmd] if isinstance(self.cmd, str) else list(self.cmd)


class ExecResult(BaseModel):
    pid: int
    exit_code: int
    signal: int | None = None
    timed_out: bool = False
    stdout: str
    stderr: str
    stdout_truncated: bool = Field(False, description="stdout is only the first SHOAL_EXEC_MAX_OUTPUT bytes "
                                                      "(16 MiB by default; less under load): stream to get it all.")
    stderr_truncated: bool = Field(False, description="The same for stderr.")
    oom_killed: bool = Field(False, description="The OOM killer took the command (the sandbox's memory limit "
                                                "was reached); the sandbox and its agent live on.")


class Started(BaseModel):
    pid: int


class ProcessInfo(BaseModel):
    pid: int
    cmd: str
    args: list[str]
    tag: str | None = None
    cwd: str | None = None
    pty: bool = False


class SignalRequest(Strict):
    signal: int = Field(9, ge=1, le=64)


class StdinRequest(Strict):
    data: Text = Field("", description="Text to write.")
    data_b64: Text | None = Field(None, description="Bytes to write, base64 (instead of data).")


class Entry(BaseModel):
    name: str
    path: str
    type: Literal["file", "dir", "symlink", "other"]
    size: int
    mode: int
    permissions: str
    owner: str
    group: str
    modified: float
    symlink_target: str | None = None


class PathRequest(Strict):
    path: Text = Field(..., min_length=1, max_length=4096)


class MoveRequest(Strict):
    src: Text = Field(..., min_length=1, max_length=4096)
    dst: Text = Field(..., min_length=1, max_length=4096)


class NetworkCreate(Strict):
    name: Text = Field(..., min_length=1, max_length=32, description="Lower-case letters, digits and '-'.")


class PrivateNetworkInfo(BaseModel):
    name: str
    created_at: float
    members: list[str] = Field(description="Ids of the sandboxes in it (any state).")


class ListeningPort(BaseModel):
    port: int
    address: str
    family: Literal[4, 6]


class ExposeRequest(Strict):
    port: StrictInt = Field(..., ge=1, le=65535, description="The port inside the sandbox.")
    host_port: StrictInt | None = Field(None, ge=1024, le=65535, description="Default: one the kernel picks.")
    bind: Text = Field("127.0.0.1", max_length=64, description="A host address to listen on (default loopback).")


class ExposedPort(BaseModel):
    sandbox_id: str
    port: int
    host_port: int
    bind: str


class Health(BaseModel):
    status: str
    version: str


# --- snapshots and fork (server/routes/snapshots.py) ------------------------------------------------
class SnapshotCreate(Strict):
    name: Text | None = Field(None, min_length=1, max_length=63, description="Unique per API key: letters, "
                              "digits, . _ -, starting with a letter or digit.")


class Snapshot(BaseModel):
    id: str
    name: str | None = None
    template: str = Field(..., description="The template it stacks on.")
    parent: str | None = Field(None, description="The snapshot it stacks on (a snapshot of a sandbox made from a "
                               "snapshot): its layers are parent's plus its own.")
    source_sandbox: str | None = None
    created_at: datetime
    size_bytes: int = Field(..., description="Bytes of its own compressed layer on the host.")

    @classmethod
    def of(cls, snap: object) -> Snapshot:
        d = snap.to_dict()  # type: ignore[attr-defined]
        return cls(**{**d, "created_at": datetime.fromtimestamp(d["created_at"], UTC)})


class ForkRequest(Strict):
    count: StrictInt = Field(1, ge=1, le=100)
    timeout: int | None = Field(None, ge=LIMITS.timeout.low, le=LIMITS.timeout.high,
                                description="Seconds until each fork is deleted (default: the parent's time left).")


class ForkError(BaseModel):
    code: str
    message: str


class ForkResult(BaseModel):
    sandbox: Sandbox | None = None
    error: ForkError | None = None


class ForkResponse(BaseModel):
    memory_copied: bool = Field(False, description="Always false: forks start new processes on the parent's "
                                "files; nothing of its memory is copied.")
    forks: list[ForkResult]


class SnapshotTemplate(Strict):
    name: Text = Field(..., min_length=1, max_length=63, description="The new template's name.")
