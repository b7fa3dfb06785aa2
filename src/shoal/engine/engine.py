"""The engine: sandbox lifecycle on one host, independent of HTTP and of kernels.

Its public actions are ``create``, ``get``, ``list``, ``agent`` (the channel for exec and files),
``destroy`` and ``reconcile``. Each names the states it is allowed in. The store is written before
the host is touched (state ``creating``, with the owning pid), so a reconcile running in another
process never mistakes a sandbox being born for a leak.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from shoal.engine.admission import HostCapacity
from shoal.engine.keys import ApiKey, KeyStore
from shoal.engine.models import (
    TRANSITIONS,
    SandboxEvent,
    SandboxRecord,
    SandboxState,
    new_sandbox_id,
    valid_sandbox_id,
)
from shoal.engine.store import Store
from shoal.errors import InvalidRequest, InvalidTransition, NotFound, QuotaExceeded, ShoalError
from shoal.images import TemplateStore
from shoal.runtime.agent_client import AgentClient, ExecResult
from shoal.runtime.base import Runtime, SandboxSpec
from shoal.settings import Settings

Progress = Callable[[str, float | None], None]
#: ``listener(event)``: event is a dict with ``type`` (a ``SandboxEvent`` value), ``time`` and ``sandbox``
#: (the record as a dict). Called from whichever thread acted.
Listener = Callable[[dict], None]
MAX_TIMEOUT = 7 * 24 * 3600.0

LIMITS = {"cpu": (0.05, 64.0), "memory_mb": (16, 256 * 1024), "disk_mb": (16, 1024 * 1024)}


def _check_text(label: str, text: object) -> None:
    """Strings that reach a process or the store must be valid UTF-8 without NUL bytes."""
    if not isinstance(text, str):
        raise InvalidRequest(f"{label} must map strings to strings")
    if "\0" in text:
        raise InvalidRequest(f"{label} must be text without NUL bytes")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequest(f"{label} contains text that is not valid UTF-8") from exc


def unusable(rec: SandboxRecord) -> ShoalError:
    """Why a sandbox that is not RUNNING cannot be used: one wording for every API."""
    if rec.state is SandboxState.ERROR:
        return InvalidTransition(f"failed ({rec.reason or 'unknown reason'}); delete it", "use", rec.id)
    return InvalidTransition(rec.state.value, "use", rec.id)


def process_start_time(pid: int) -> int | None:
    """The kernel's start time of ``pid`` (clock ticks since boot): tells a live owner from pid reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data[data.rindex(b")") + 2:].split()[19])
    except (OSError, ValueError, IndexError):
        return None


class Engine:
    """Sandboxes on this host. Thread-safe; several processes may use the same state at once."""

    def __init__(self, settings: Settings | None = None, runtime: Runtime | None = None,
                 templates: TemplateStore | None = None) -> None:
        self.settings = settings or Settings()
        if os.geteuid() != 0:
            raise InvalidRequest("Shoal needs root to create namespaces, cgroups and mounts (run it with sudo)")
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        self.templates = templates or TemplateStore(self.settings)
        if runtime is None:
            from shoal.runtime.linux.runtime import LinuxRuntime
            runtime = LinuxRuntime(self.settings)
        self.runtime = runtime
        self.store = Store(self.settings.db_path)
        self.keys = KeyStore(self.settings.db_path)
        self._listeners: list[Listener] = []
        self._admission = threading.Lock()
        self.capacity = HostCapacity.of_this_host()

    # --- events ----------------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` for every lifecycle event; returns the unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _emit(self, kind: SandboxEvent, rec: SandboxRecord) -> None:
        event = {"type": kind.value, "time": time.time(), "sandbox": rec.to_dict()}
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - a broken subscriber must not break the engine
                pass

    # --- actions ---------------------------------------------------------------------------
    def create(self, template: str = "minimal", *, cpu: float = 1.0, memory_mb: int = 512, disk_mb: int = 1024,
               env: dict[str, str] | None = None, metadata: dict[str, str] | None = None,
               owner_pid: int | None = None, build: bool = True, progress: Progress | None = None,
               wait: bool = False, timeout: float | None = None, api_key: ApiKey | None = None) -> SandboxRecord:
        """Create a running sandbox from ``template``.

        ``owner_pid`` makes it ephemeral: reconcile deletes it once that process is gone.
        A known but unbuilt template is built first when ``build`` (with ``progress``).
        ``wait`` returns only once the agent answers (otherwise the first call waits for it).
        ``timeout`` (seconds) sets the expiry, after which ``expire`` deletes it; ``api_key`` owns it
        and its limits apply.
        """
        for name, value in (("cpu", cpu), ("memory_mb", memory_mb), ("disk_mb", disk_mb)):
            lo, hi = LIMITS[name]
            if not isinstance(value, (int, float)) or not lo <= value <= hi:
                raise InvalidRequest(f"{name} must be between {lo} and {hi}, not {value!r}")
        if timeout is not None and not 0 < timeout <= MAX_TIMEOUT:
            raise InvalidRequest(f"timeout must be between 1 and {int(MAX_TIMEOUT)} seconds, not {timeout!r}")
        for label, table in (("env", env or {}), ("metadata", metadata or {})):
            for k, v in table.items():
                _check_text(label, k)
                _check_text(label, v)
                if label == "env" and (not k or "=" in k):
                    raise InvalidRequest(f"invalid environment variable {k!r}")
        info = self.templates.get(template)  # NotFound for unknown names
        if not info.built:
            if not build:
                raise NotFound(f"template '{template}' is not built; run: shoal template build {template}")
            self.templates.build(template, progress=progress)
        lower = self.templates.mount(template)
        with self._admission:  # quota check and record insert as one step, or parallel creates overrun it
            self.capacity.admit(self.store.all(), float(cpu), int(memory_mb))
            if api_key is not None:
                self._check_quota(api_key, int(memory_mb))
            rec = self._new_record(template, cpu, memory_mb, disk_mb, env, metadata, owner_pid, timeout, api_key)
            self.store.put(rec)
        try:
            self.runtime.create(SandboxSpec(rec.id, template, lower, rec.cpu, rec.memory_mb, rec.disk_mb,
                                            env=rec.env))
        except BaseException:
            self.store.delete(rec.id)
            raise
        rec.state = SandboxState.RUNNING
        if owner_pid is None:  # persistent: nobody owns it once it runs
            rec.owner_pid = rec.owner_start = None
        self.store.put(rec)
        self._emit(SandboxEvent.CREATED, rec)
        if wait:
            self.agent(rec.id).wait_ready()
        return rec

    def _new_record(self, template: str, cpu: float, memory_mb: int, disk_mb: int, env: dict[str, str] | None,
                    metadata: dict[str, str] | None, owner_pid: int | None, timeout: float | None,
                    api_key: ApiKey | None) -> SandboxRecord:
        return SandboxRecord(
            id=new_sandbox_id(), template=template, state=SandboxState.CREATING, cpu=float(cpu),
            memory_mb=int(memory_mb), disk_mb=int(disk_mb), created_at=time.time(), runtime=self.runtime.name,
            env=dict(env or {}), metadata=dict(metadata or {}), owner_pid=owner_pid or os.getpid(),
            owner_start=process_start_time(owner_pid or os.getpid()),
            expires_at=time.time() + timeout if timeout else None, api_key=api_key.id if api_key else None,
        )

    def _check_quota(self, key: ApiKey, memory_mb: int) -> None:
        mine = [r for r in self.store.all() if r.api_key == key.id]
        if key.max_sandboxes is not None and len(mine) >= key.max_sandboxes:
            raise QuotaExceeded(f"API key {key.name} may run at most {key.max_sandboxes} sandboxes at once")
        used = sum(r.memory_mb for r in mine)
        if key.max_memory_mb is not None and used + memory_mb > key.max_memory_mb:
            raise QuotaExceeded(f"API key {key.name} may use at most {key.max_memory_mb} MiB in total "
                                f"({used} MiB in use, {memory_mb} MiB asked)")

    def get(self, sandbox_id: str, api_key: ApiKey | None = None) -> SandboxRecord:
        """Any state. With ``api_key``, another key's sandbox does not exist."""
        rec = self.store.get(sandbox_id) if valid_sandbox_id(sandbox_id) else None
        if rec is None or (api_key is not None and rec.api_key != api_key.id):
            raise NotFound(f"sandbox {sandbox_id} does not exist")
        return rec

    def list(self, api_key: ApiKey | None = None, states: set[SandboxState] | None = None,
             metadata: dict[str, str] | None = None) -> list[SandboxRecord]:
        """Sandboxes, optionally only the key's own, in ``states``, carrying all of ``metadata``."""
        out = []
        for rec in self.store.all():
            if api_key is not None and rec.api_key != api_key.id:
                continue
            if states and rec.state not in states:
                continue
            if metadata and any(rec.metadata.get(k) != v for k, v in metadata.items()):
                continue
            out.append(rec)
        return out

    def set_timeout(self, sandbox_id: str, timeout: float, api_key: ApiKey | None = None) -> SandboxRecord:
        """RUNNING or PAUSED: the sandbox now expires ``timeout`` seconds from now."""
        rec = self.get(sandbox_id, api_key)
        if rec.state not in (SandboxState.RUNNING, SandboxState.PAUSED):
            raise InvalidTransition(rec.state.value, "set the timeout of", sandbox_id)
        if not 0 < timeout <= MAX_TIMEOUT:
            raise InvalidRequest(f"timeout must be between 1 and {int(MAX_TIMEOUT)} seconds, not {timeout!r}")
        rec.expires_at = time.time() + timeout
        self.store.put(rec)
        self._emit(SandboxEvent.TIMEOUT, rec)
        return rec

    def pause(self, sandbox_id: str, api_key: ApiKey | None = None) -> SandboxRecord:
        """RUNNING → PAUSED: every process is frozen; memory and files stay."""
        rec = self.get(sandbox_id, api_key)
        if rec.state is not SandboxState.RUNNING:
            raise InvalidTransition(rec.state.value, "pause", sandbox_id)
        self.runtime.pause(sandbox_id)
        self._move(rec, SandboxState.PAUSED)
        self._emit(SandboxEvent.PAUSED, rec)
        return rec

    def resume(self, sandbox_id: str, api_key: ApiKey | None = None) -> SandboxRecord:
        """PAUSED → RUNNING."""
        rec = self.get(sandbox_id, api_key)
        if rec.state is not SandboxState.PAUSED:
            raise InvalidTransition(rec.state.value, "resume", sandbox_id)
        self.runtime.resume(sandbox_id)
        self._move(rec, SandboxState.RUNNING)
        self._emit(SandboxEvent.RESUMED, rec)
        return rec

    def expire(self, now: float | None = None) -> list[str]:
        """Delete every RUNNING (or failed) sandbox past its expiry (paused ones wait to be resumed)."""
        now = time.time() if now is None else now
        gone = []
        for rec in self.store.all():
            if (rec.expires_at is not None and rec.expires_at <= now
                    and rec.state in (SandboxState.RUNNING, SandboxState.ERROR)):
                self._emit(SandboxEvent.EXPIRED, rec)
                try:
                    self.destroy(rec.id)
                    gone.append(rec.id)
                except NotFound:
                    pass
        return gone

    def agent(self, sandbox_id: str, api_key: ApiKey | None = None) -> AgentClient:
        """The exec/files channel of a RUNNING sandbox."""
        rec = self.get(sandbox_id, api_key)
        if rec.state is not SandboxState.RUNNING:
            raise unusable(rec)
        return AgentClient(str(self.runtime.agent_socket(sandbox_id)), sandbox_id)

    def run(self, sandbox_id: str, cmd: list[str], **kwargs: object) -> ExecResult:
        return self.agent(sandbox_id).run(cmd, **kwargs)  # type: ignore[arg-type]

    def destroy(self, sandbox_id: str, api_key: ApiKey | None = None) -> None:
        """Any state but DELETED; frees every host resource even if a step fails."""
        rec = self.get(sandbox_id, api_key)
        if rec.state is not SandboxState.STOPPING and SandboxState.STOPPING not in TRANSITIONS[rec.state]:
            raise InvalidTransition(rec.state.value, "delete", sandbox_id)
        # Whoever stops it owns it until it is gone: a reconcile elsewhere finishes it only if we die.
        rec.state, rec.owner_pid, rec.owner_start = SandboxState.STOPPING, os.getpid(), process_start_time(os.getpid())
        self.store.put(rec)
        try:
            self.runtime.destroy(sandbox_id)
        finally:
            self.store.delete(sandbox_id)
            rec.state = SandboxState.DELETED
            self._emit(SandboxEvent.DELETED, rec)

    def check_health(self) -> list[str]:
        """Move RUNNING sandboxes whose agent (PID 1) is gone to ``error``; returns their ids.

        Sandbox root can take its own agent down (fill memory, ``prlimit``, ptrace); the API must then
        say so instead of reporting ``running`` while every call fails. When PID 1 dies the kernel kills
        the whole sandbox, so its host resources are freed at once; the record stays, in ``error`` with
        the reason, until it is deleted or expires.
        """
        failed = []
        for rec in self.store.all():
            if rec.state is not SandboxState.RUNNING or self.runtime.is_alive(rec.id):
                continue
            oom = (self.runtime.usage(rec.id).get("oom_kills") or 0) > 0
            reason = ("its agent (PID 1) was killed by the out-of-memory killer" if oom
                      else "its agent (PID 1) exited")
            if not self.store.fail(rec.id, SandboxState.RUNNING, reason):
                continue  # a pause or delete got there first
            rec.state, rec.reason = SandboxState.ERROR, reason
            try:
                self.runtime.destroy(rec.id)
            except (ShoalError, OSError):
                pass  # the record stays; delete or the next reconcile retries
            self._emit(SandboxEvent.DIED, rec)
            failed.append(rec.id)
        return failed

    def _move(self, rec: SandboxRecord, to: SandboxState) -> None:
        if to not in TRANSITIONS[rec.state] and rec.state is not to:
            raise InvalidTransition(rec.state.value, f"move to {to.value}", rec.id)
        rec.state = to
        self.store.set_state(rec.id, to)

    # --- recovery --------------------------------------------------------------------------
    @contextmanager
    def _reconcile_lock(self) -> Iterator[bool]:
        fd = os.open(self.settings.state_dir / "reconcile.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            yield True
        finally:
            os.close(fd)

    def _owner_alive(self, rec: SandboxRecord) -> bool:
        if rec.owner_pid is None:
            return False
        return process_start_time(rec.owner_pid) == rec.owner_start

    def reconcile(self) -> list[str]:
        """Delete what a crashed process left: sandboxes whose owner died or whose agent is gone,
        and host resources no record explains. Returns the ids cleaned up."""
        cleaned: list[str] = []
        with self._reconcile_lock() as mine:
            if not mine:
                return cleaned  # another process is reconciling right now
            # The host first, then the store: a sandbox's record is written before its first host
            # resource, so anything found on the host that the later snapshot lacks is truly orphaned.
            on_host = self.runtime.existing()
            known = {}
            for rec in self.store.all():
                known[rec.id] = rec
                if rec.state in (SandboxState.CREATING, SandboxState.STOPPING):
                    dead = not self._owner_alive(rec)  # its creator or destroyer died mid-way
                elif rec.owner_pid is not None and not self._owner_alive(rec):
                    dead = True  # an ephemeral sandbox (shoal run) whose owner is gone
                else:
                    dead = rec.state is SandboxState.RUNNING and not self.runtime.is_alive(rec.id)
                if dead:
                    self._force_destroy(rec.id)
                    cleaned.append(rec.id)
            for sid in on_host - set(known):
                self._force_destroy(sid)
                cleaned.append(sid)
        return cleaned

    def _force_destroy(self, sandbox_id: str) -> None:
        try:
            self.runtime.destroy(sandbox_id)
        except (ShoalError, OSError):
            pass  # left for the next reconcile; one stubborn sandbox must not stop the others
        self.store.delete(sandbox_id)
