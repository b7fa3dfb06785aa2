"""The engine: sandbox lifecycle on one host, independent of HTTP and of kernels.

Its public actions are ``create``, ``get``, ``list``, ``agent`` (the channel for exec and files),
``destroy`` and ``reconcile``. Each names the states it is allowed in. The store is written before
the host is touched (state ``creating``, with the owning pid), so a reconcile running in another
process never mistakes a sandbox being born for a leak.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from shoal import refill
from shoal.engine.admission import HostCapacity
from shoal.engine.keys import ApiKey, KeyStore
from shoal.engine.limits import LIMITS
from shoal.engine.models import (
    TRANSITIONS,
    PauseMode,
    SandboxEvent,
    SandboxRecord,
    SandboxState,
    new_sandbox_id,
    valid_sandbox_id,
)
from shoal.engine.networks import NetworkRegistry, network_id
from shoal.engine.snapshots import Snapshots
from shoal.engine.standby import check_standby_after, wakes_on_traffic
from shoal.engine.store import Store
from shoal.engine.template_access import check_usable
from shoal.engine.text import check_text
from shoal.engine.volumes import Volumes
from shoal.errors import (
    Conflict,
    InvalidRequest,
    InvalidTransition,
    NotFound,
    QuotaExceeded,
    RuntimeFailure,
    ShoalError,
    from_errno,
)
from shoal.host_processes import process_start_time
from shoal.images import TemplateStore
from shoal.images.start_cmd import start_template_process
from shoal.locks import file_lock
from shoal.net import Lease, NetConfig, Network
from shoal.net.policy import egress_rules
from shoal.runtime.agent_client import AgentClient, ExecResult
from shoal.runtime.base import Runtime, SandboxSpec
from shoal.settings import Settings
from shoal.storage.layers import DEFAULT_KIND, KINDS, DiskUsage
from shoal.storage.mount_points import symlink_on_path

Progress = Callable[[str, float | None], None]
#: ``listener(event)``: event is a dict with ``type`` (a ``SandboxEvent`` value), ``time`` and ``sandbox``
#: (the record as a dict). Called from whichever thread acted.
Listener = Callable[[dict], None]
#: Why a sandbox that was running is paused to its filesystem after the daemon started again.
HOST_RESTART_REASON = ("its processes were gone when the daemon started (host restart?): paused with its "
                       "files kept; resume starts it again")


def unusable(rec: SandboxRecord) -> ShoalError:
    """Why a sandbox that is not RUNNING cannot be used: one wording for every API."""
    if rec.state is SandboxState.ERROR:
        return InvalidTransition(f"failed ({rec.reason or 'unknown reason'}); delete it", "use", rec.id)
    return InvalidTransition(rec.state.value, "use", rec.id)


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
        net_config = NetConfig.from_env()
        #: Sandbox networking (None with ``SHOAL_NET=0``); set up on first use, not here.
        self.network = Network.for_settings(self.settings, net_config) if net_config.enabled else None
        self.store = Store(self.settings.db_path)
        self.keys = KeyStore(self.settings.db_path)
        #: Snapshots of sandboxes' files and the layer stacks made from them (``engine/snapshots.py``).
        self.snapshots = Snapshots(self)
        #: Named volumes (``engine/volumes.py``): per key, mounted once on the host, bound into sandboxes.
        self.volumes = Volumes(self.settings, self.store)
        #: Private networks per API key (``engine/networks.py``); membership is fixed at create.
        self.private_networks = NetworkRegistry(self.settings.db_path)
        self._listeners: list[Listener] = []
        self._admission = threading.Lock()
        self.capacity = HostCapacity.of_this_host()
        self._transitions: dict[str, threading.Lock] = {}
        self._transitions_guard = threading.Lock()
        #: OOM kills already reported per sandbox (``check_health``).
        self._oom_seen: dict[str, int] = {}

    # --- events ----------------------------------------------------------------------------
    def subscribe(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` for every lifecycle event; returns the unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def _emit(self, kind: SandboxEvent, rec: SandboxRecord, **extra: object) -> None:
        event = {"type": kind.value, "time": time.time(), "sandbox": rec.to_dict(), **extra}
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - a broken subscriber must not break the engine
                pass

    # --- actions ---------------------------------------------------------------------------
    @refill.creating()  # the pools refill after this and its first call, not beside them (shoal/refill.py)
    def create(self, template: str = "minimal", *, cpu: float = 1.0, memory_mb: int = 512, disk_mb: int = 1024,
               env: dict[str, str] | None = None, metadata: dict[str, str] | None = None,
               owner_pid: int | None = None, build: bool = True, progress: Progress | None = None,
               wait: bool = False, timeout: float | None = None, api_key: ApiKey | None = None,
               layer: str = DEFAULT_KIND, internet: bool | None = None, network: bool = True,
               networks: list[str] | None = None, name: str | None = None, volumes: list | None = None,
               standby_after: float | None = None, start: bool = True,
               snapshot: str | None = None, egress: dict | None = None,
               net_limits: dict | None = None) -> SandboxRecord:
        """Create a running sandbox from ``template``.

        ``owner_pid`` makes it ephemeral: reconcile deletes it once that process is gone.
        A known but unbuilt template is built first when ``build`` (with ``progress``).
        ``wait`` returns only once the agent answers (otherwise the first call waits for it).
        ``timeout`` (seconds) sets the expiry, after which ``expire`` deletes it; ``api_key`` owns it
        and its limits apply. ``layer``: ``disk`` (default; the files live on the host's disk, survive a
        restart, and a full layer is ENOSPC) or ``ram`` (tmpfs: faster, counted as the sandbox's memory).
        ``internet``: False keeps it from reaching past the host (None: the daemon's ``SHOAL_INTERNET``);
        ``network``: False gives it only loopback (``shoal bench`` compares the two).
        ``networks``: private networks (of ``api_key``) it joins, ``name`` its DNS name in them.
        ``volumes``: ``[{name, path, read_only}]`` of ``api_key``'s volumes to mount; ``standby_after``: idle
        seconds before standby (``engine/standby.py``; None: the daemon's default, 0: never).
        ``egress``: its egress policy, ``net_limits``: bandwidth and connection cap (shoal.net.policy).
        """
        net_rules = egress_rules(egress, net_limits, internet)  # validated before anything is made
        if layer not in KINDS:
            raise InvalidRequest(f"layer must be one of {', '.join(KINDS)}, not {layer!r}")
        for limit, value in (("cpu", cpu), ("memory_mb", memory_mb), ("disk_mb", disk_mb)):
            LIMITS.check(limit, value)
        if timeout is not None:
            LIMITS.timeout.check(timeout)
        for label, table in (("env", env or {}), ("metadata", metadata or {})):
            for k, v in table.items():
                check_text(k, f"a key of {label}")
                check_text(v, f"{label}[{k!r}]")
                if label == "env" and (not k or "=" in k):
                    raise InvalidRequest(f"invalid environment variable {k!r}")
        snap = self.snapshots.get(snapshot, api_key, internal=True) if snapshot is not None else None
        if snap is not None:  # the snapshot's files on the template it was taken on (engine/snapshots.py)
            template = snap.template
        info = self.templates.get(template)  # NotFound for unknown names
        check_usable(self.templates._read_meta(template), template, api_key)  # another key's: NotFound
        if not info.built:
            if not build:
                raise NotFound(f"template '{template}' is not built; run: shoal template build {template}")
            self.templates.build(template, progress=progress)
        lower = self.templates.mount(template)
        if snap is not None:
            self.snapshots.check_template(snap)
        snap_layers = self.snapshots.lowers(snap.id) if snap is not None else ()
        with self._admission:  # quota check and record insert as one step, or parallel creates overrun it
            self.capacity.admit(self.store.all(), float(cpu), int(memory_mb))
            if api_key is not None:
                self._check_quota(api_key, int(memory_mb))
            rec = self._new_record(template, cpu, memory_mb, disk_mb, env, metadata, owner_pid, timeout, api_key)
            rec.layer = layer
            rec.snapshot = snap.id if snap is not None else None
            if networks or name is not None:
                if self.network is None or not network:
                    raise InvalidRequest("private networks need sandbox networking (SHOAL_NET is off)")
                self.private_networks.check_join(rec.api_key, list(networks or []), name, self.store.all())
                rec.networks, rec.name = list(dict.fromkeys(networks or [])), name
            rec.standby_after = check_standby_after(standby_after)
            with self.volumes.lock() if volumes else contextlib.nullcontext():  # rm reads records under it
                rec.volumes = self.volumes.resolve(volumes, api_key)
                for m in rec.volumes:  # a symlink a build or a snapshot left there: crun would follow it
                    if (link := symlink_on_path((*snap_layers, lower), m["path"])) is not None:
                        raise InvalidRequest(f"volume mount path {m['path']}: {link} is a symlink in the "
                                             "sandbox's template or snapshot")
                self.store.put(rec)
        try:
            lease = None
            volume_mounts = self.volumes.attach(rec)
            if self.network is not None and network:
                lease = self.network.claim(rec.id, internet=internet is not False, lower_dir=lower,
                                           **self._private_nets(rec), **net_rules)
                rec.address, rec.address6, rec.internet = lease.ipv4, lease.ipv6, lease.internet
            boot_id = str(uuid.uuid4())
            self.runtime.create(SandboxSpec(rec.id, template, lower, rec.cpu, rec.memory_mb, rec.disk_mb,
                                            env={**(lease.env if lease else {}), **rec.env}, layer=rec.layer,
                                            volumes=volume_mounts, lower_layers=snap_layers, boot_id=boot_id,
                                            **self._net_spec(rec.id, lease)))
        except BaseException:
            self._release_net(rec.id)
            self.store.delete(rec.id)
            if rec.volumes:
                self.volumes.release()
            raise
        rec.state = SandboxState.RUNNING
        if owner_pid is None:  # persistent: nobody owns it once it runs
            rec.owner_pid = rec.owner_start = None
        rec.started_at, rec.boot_id = time.time(), boot_id
        self._oom_seen[rec.id] = 0
        self.store.put(rec)
        self._emit(SandboxEvent.CREATED, rec)
        if wait:
            self.agent(rec.id).wait_ready()
        if start:  # the template's start command (images/start_cmd.py); not ready in time → removed
            start_template_process(self, rec.id, self.templates._read_meta(template))
        return rec

    def pools_full(self) -> bool:
        """Whether every pool of this process is full (the steady state ``shoal bench`` measures from)."""
        return (self.network is None or self.network.full()) and self.runtime.pools_full()

    def close_pools(self) -> None:
        """Free what this process keeps ready for creates: network slots, user namespaces, mounted layers.
        Each is also freed at exit, but a daemon stopped by a signal may never get there (see
        ``server/daemon.py``); what a dead process leaves, the next reconcile sweeps."""
        if self.network is not None:
            self.network.close()
        self.runtime.close_pools()

    def delete_network(self, name: str, api_key: ApiKey | None = None) -> None:
        """Remove a private network of ``api_key``; 409 while it has members. Under the admission lock, so
        no create joins it between the check and the removal."""
        with self._admission:
            self.private_networks.delete(api_key.id if api_key else None, name, self.store.all())

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
        LIMITS.timeout.check(timeout)
        rec.expires_at = time.time() + timeout
        self.store.put(rec)
        self._emit(SandboxEvent.TIMEOUT, rec)
        return rec

    def pause(self, sandbox_id: str, api_key: ApiKey | None = None,
              mode: PauseMode | str = PauseMode.MEMORY, reason: str | None = None) -> SandboxRecord:
        """RUNNING → PAUSED. ``memory``: every process is frozen; memory and files stay.
        ``filesystem`` (also from a memory pause): every process is stopped and its memory freed; the
        files stay on the host's disk (``disk`` layer only) and ``resume`` starts the sandbox from them.
        ``reason``: why (``engine/standby.py``'s reasons let traffic wake it; a user's pause has none)."""
        try:
            mode = PauseMode(mode)
        except ValueError as exc:
            raise InvalidRequest(f"pause mode must be memory or filesystem, not {mode!r}") from exc
        with self._transition(sandbox_id):
            rec = self.get(sandbox_id, api_key)
            if mode is PauseMode.MEMORY and wakes_on_traffic(rec) and rec.pause_mode == mode.value and not reason:
                rec.reason = None  # the user pauses a sandbox in standby: now only the user resumes it
                self.store.put(rec)
            elif mode is PauseMode.MEMORY:
                if rec.state is not SandboxState.RUNNING:
                    raise InvalidTransition(rec.state.value, "pause", sandbox_id)
                self.runtime.pause(sandbox_id)
                rec.pause_mode, rec.reason = PauseMode.MEMORY.value, reason
                self._move(rec, SandboxState.PAUSED)
                self.store.put(rec)
            else:
                rec.reason = reason
                self._pause_to_filesystem(rec)
        self._emit(SandboxEvent.PAUSED, rec)
        return rec

    def _pause_to_filesystem(self, rec: SandboxRecord) -> None:
        if not (rec.state is SandboxState.RUNNING or (rec.state is SandboxState.PAUSED
                                                      and rec.pause_mode != PauseMode.FILESYSTEM.value)):
            raise InvalidTransition(rec.state.value if rec.state is not SandboxState.PAUSED
                                    else "paused to its filesystem", "pause to the filesystem", rec.id)
        if rec.layer != "disk":
            raise Conflict(f"sandbox {rec.id} keeps its files in memory (layer {rec.layer}): pausing to the "
                           "filesystem would lose them; create it with layer disk, or pause keeping memory")
        # The record says "paused to the filesystem" before the host is touched: if this process dies
        # half-way, reconcile (and resume) finish the stop from there; the files are never at risk.
        rec.state, rec.pause_mode = SandboxState.PAUSED, PauseMode.FILESYSTEM.value
        self.store.put(rec)
        self._oom_seen.pop(rec.id, None)
        try:
            self.runtime.stop(rec.id)
        except OSError as exc:
            raise RuntimeFailure(f"{from_errno(exc, f'stopping sandbox {rec.id}').message} (its files are kept; "
                                 "resume or the next reconcile finishes the stop)", "pause", rec.id) from exc
        if rec.volumes:
            self.volumes.release()

    def resume(self, sandbox_id: str, api_key: ApiKey | None = None) -> SandboxRecord:
        """PAUSED → RUNNING: thawed (memory pause), or started again from its files (filesystem pause:
        new processes, a new ``boot_id``). A failed start leaves it paused with its files."""
        with self._transition(sandbox_id):
            rec = self.get(sandbox_id, api_key)
            if rec.state is not SandboxState.PAUSED:
                raise InvalidTransition(rec.state.value, "resume", sandbox_id)
            if rec.pause_mode == PauseMode.FILESYSTEM.value:
                self._start_from_files(rec)
            else:
                self.runtime.resume(sandbox_id)
            rec.pause_mode = rec.reason = None
            self._move(rec, SandboxState.RUNNING)
            self.store.put(rec)
        self._emit(SandboxEvent.RESUMED, rec)
        return rec

    def _start_from_files(self, rec: SandboxRecord) -> None:
        try:
            if self.runtime.has_leftovers(rec.id):  # what a crashed pause or resume left running
                self.runtime.destroy(rec.id, keep_files=True)
        except OSError as exc:
            raise RuntimeFailure(from_errno(exc, f"clearing what is left of sandbox {rec.id}").message,
                                 "resume", rec.id) from exc
        if not self.runtime.has_files(rec.id):
            raise RuntimeFailure(f"the files of sandbox {rec.id} are gone from the host", "resume", rec.id)
        lower = self.templates.mount(rec.template)
        net = self._net_spec(rec.id)
        claimed = False
        if not net and self.network is not None and rec.address is not None:
            # Its slot is gone (a host reboot emptied the run directory): a new one, maybe new addresses.
            lease = self.network.claim(rec.id, internet=rec.internet is not False, lower_dir=lower,
                                       **self._private_nets(rec))
            rec.address, rec.address6, claimed = lease.ipv4, lease.ipv6, True
            net = self._net_spec(rec.id, lease)
        boot_id = str(uuid.uuid4())  # a new boot: what the sandbox reads in /proc/sys/kernel/random/boot_id
        try:
            self.runtime.create(SandboxSpec(rec.id, rec.template, lower, rec.cpu, rec.memory_mb, rec.disk_mb,
                                            env=rec.env, layer=rec.layer, keep_files=True,
                                            volumes=self.volumes.attach(rec), **net, boot_id=boot_id,
                                            lower_layers=self.snapshots.lowers(rec.snapshot) if rec.snapshot else ()))
        except BaseException:
            if claimed:
                self._release_net(rec.id)
            if rec.volumes:
                self.volumes.release()
            raise
        rec.started_at, rec.boot_id = time.time(), boot_id
        self._oom_seen[rec.id] = 0

    @contextmanager
    def _transition(self, sandbox_id: str) -> Iterator[None]:
        """One pause/resume of a sandbox at a time in this process, and none while a reconcile (in any
        process) runs: reconcile takes its lock exclusively, a transition takes it shared. A reconcile
        must never see a sandbox half-started by a resume and tear it down as a leftover."""
        with self._transitions_guard:
            lock = self._transitions.setdefault(sandbox_id, threading.Lock())
        with lock, file_lock(self.settings.state_dir / "reconcile.lock", exclusive=False):
            yield

    def disk_usage(self, sandbox_id: str) -> DiskUsage | None:
        """Used/total bytes of the sandbox's writable layer while it is mounted (running or frozen)."""
        usage = self.runtime.disk_usage(sandbox_id)
        return usage if isinstance(usage, DiskUsage) else None

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
            self._release_net(sandbox_id)
            self.store.delete(sandbox_id)
            self._forget_net(sandbox_id)
            self._oom_seen.pop(sandbox_id, None)
            if rec.volumes:
                self.volumes.release()
            self.snapshots.collect(rec.snapshot)  # a fork's snapshot goes with its last sandbox
            rec.state = SandboxState.DELETED
            self._emit(SandboxEvent.DELETED, rec)

    def check_health(self) -> list[str]:
        """Take RUNNING sandboxes whose agent (PID 1) is gone out of ``running``; returns their ids.

        Sandbox root can take its own agent down (fill memory, ``prlimit``, ptrace); the API must then
        say so instead of reporting ``running`` while every call fails. When PID 1 dies the kernel kills
        the whole sandbox. A ``disk`` sandbox keeps its files: it becomes paused to its filesystem, with
        the reason, and resume starts it again. A ``ram`` sandbox's files died with it: it moves to
        ``error`` with the reason and its host resources are freed at once. Either way: a ``died`` event.
        """
        failed = []
        for rec in self.store.all():
            if rec.state is not SandboxState.RUNNING or self.runtime.is_alive(rec.id):
                continue
            oom = (self.runtime.usage(rec.id).get("oom_kills") or 0) > 0
            reason = ("its agent (PID 1) was killed by the out-of-memory killer" if oom
                      else "its agent (PID 1) exited")
            keep = rec.layer != "ram" and self.runtime.has_files(rec.id)
            if keep:
                reason += "; paused with its files kept: resume starts it again"
                moved = self.store.transition(rec.id, SandboxState.RUNNING, SandboxState.PAUSED, reason,
                                              PauseMode.FILESYSTEM.value)
            else:
                moved = self.store.transition(rec.id, SandboxState.RUNNING, SandboxState.ERROR, reason)
            if not moved:
                continue  # a pause or delete got there first
            rec.reason = reason
            if keep:
                rec.state, rec.pause_mode = SandboxState.PAUSED, PauseMode.FILESYSTEM.value
                self._finish_stop(rec)  # its network slot stays: the same addresses after resume
            else:
                rec.state = SandboxState.ERROR
                try:
                    self.runtime.destroy(rec.id)
                    self._release_net(rec.id)
                except (ShoalError, OSError):
                    pass  # the record stays; delete or the next reconcile retries
            self._emit(SandboxEvent.DIED, rec)
            failed.append(rec.id)
        self._report_oom_kills()
        return failed

    def _report_oom_kills(self) -> None:
        """Emit ``oom`` for each RUNNING sandbox whose cgroup's OOM-kill count rose since the last look.

        A sandbox this process did not start (found again after a daemon restart) is first only counted:
        its kills before now were reported by the daemon that saw them."""
        for rec in self.store.all():
            if rec.state is not SandboxState.RUNNING:
                continue
            kills = self.runtime.usage(rec.id).get("oom_kills")
            if kills is None:
                continue
            seen = self._oom_seen.setdefault(rec.id, kills)
            if kills > seen:
                self._oom_seen[rec.id] = kills
                self._emit(SandboxEvent.OOM, rec, oom_kills=kills)

    def _move(self, rec: SandboxRecord, to: SandboxState) -> None:
        if to not in TRANSITIONS[rec.state] and rec.state is not to:
            raise InvalidTransition(rec.state.value, f"move to {to.value}", rec.id)
        rec.state = to  # written by the caller's ``store.put`` right after (one write on the wake path)

    # --- recovery --------------------------------------------------------------------------
    def _reconcile_lock(self) -> contextlib.AbstractContextManager[bool]:
        """Held exclusively by one reconcile at a time (the others skip); transitions hold it shared."""
        return file_lock(self.settings.state_dir / "reconcile.lock", wait=False)

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
                elif rec.state is SandboxState.PAUSED and rec.pause_mode == PauseMode.FILESYSTEM.value:
                    self._finish_stop(rec)  # a pause to the filesystem may have died half-way
                    continue
                elif (rec.state in (SandboxState.RUNNING, SandboxState.PAUSED) and not self.runtime.is_alive(rec.id)
                      and self.runtime.has_files(rec.id) and self.runtime.disk_usage(rec.id) is None):
                    # A host restart took its processes and its mounts (an agent that merely died leaves
                    # them, and is deleted below as before); its files are on disk.
                    self._paused_by_host(rec)
                    continue
                else:
                    # Its agent is gone: a ``ram`` layer went with it (and with a host restart).
                    dead = (rec.state in (SandboxState.RUNNING, SandboxState.PAUSED)
                            and not self.runtime.is_alive(rec.id))
                if dead:
                    self._force_destroy(rec.id)
                    cleaned.append(rec.id)
            for sid in on_host - set(known):
                self._force_destroy(sid)
                cleaned.append(sid)
            if self.network is not None:  # orphaned slots freed, the rules of the rest restored
                self.network.reconcile(lambda: {rec.id for rec in self.store.all()})  # read after the slots
            self.volumes.reconcile()  # orphaned images and mounts go, live sandboxes' volumes are mounted
            self.snapshots.reconcile()  # no sandbox left frozen, no half or unused snapshot kept
            self.runtime.prune()  # what an upgrade left: the old agent runtime, on disk and mounted
        return cleaned

    def _finish_stop(self, rec: SandboxRecord) -> None:
        try:
            self.runtime.destroy(rec.id, keep_files=True)
        except (ShoalError, OSError):
            pass  # the next reconcile, or resume, tries again; the files stay either way
        if rec.volumes:
            self.volumes.release()

    def _paused_by_host(self, rec: SandboxRecord) -> None:
        self._finish_stop(rec)
        rec.state, rec.pause_mode, rec.reason = SandboxState.PAUSED, PauseMode.FILESYSTEM.value, HOST_RESTART_REASON
        self.store.put(rec)
        self._emit(SandboxEvent.PAUSED, rec)

    def _force_destroy(self, sandbox_id: str) -> None:
        try:
            self.runtime.destroy(sandbox_id)
            self._release_net(sandbox_id)
        except (ShoalError, OSError):
            pass  # left for the next reconcile; one stubborn sandbox must not stop the others
        self.store.delete(sandbox_id)
        self._forget_net(sandbox_id)
        self.volumes.release()

    # --- network (shoal.net) ---------------------------------------------------------------
    def _net_spec(self, sandbox_id: str, lease: Lease | None = None) -> dict:
        """The ``SandboxSpec`` fields that put a sandbox in its network namespace (kept across a pause to
        the filesystem: the same addresses after resume)."""
        if lease is None and self.network is not None:
            slot = self.network.slot_of(sandbox_id)
            lease = None if slot is None else self.network.lease(sandbox_id, slot, False)
        if lease is None:
            return {}
        return {"netns": str(lease.netns), "sysfs": str(lease.sysfs), "etc_files": lease.etc_files}

    @staticmethod
    def _private_nets(rec: SandboxRecord) -> dict:
        """``Network.claim``'s private-network arguments for ``rec`` (its networks' kernel ids)."""
        if not rec.networks:
            return {}
        return {"networks": tuple(network_id(rec.api_key, n) for n in rec.networks), "name": rec.name}

    def _release_net(self, sandbox_id: str) -> None:
        if self.network is not None:
            self.network.release(sandbox_id)

    def _forget_net(self, sandbox_id: str) -> None:
        """A deleted sandbox's stored egress policy goes (a resume failure's release keeps it)."""
        if self.network is not None:
            self.network.egress.files.drop(sandbox_id)

    def update_network(self, sandbox_id: str, egress: dict | None, internet: bool | None = None,
                       api_key: ApiKey | None = None) -> dict:
        """Replace a running or paused sandbox's egress policy (shoal.net.policy) in one nft batch; the
        policy as stored comes back. ``internet: false`` adds a deny of all traffic (allows still win)."""
        from shoal.net.policy import EgressPolicy

        rec = self.get(sandbox_id, api_key)
        policy = EgressPolicy.parse(egress, internet=internet is not False)
        if self.network is None or rec.address is None:
            raise InvalidRequest(f"sandbox {sandbox_id} has no network interface")
        self.network.egress.update(sandbox_id, policy)
        return policy.to_dict()
