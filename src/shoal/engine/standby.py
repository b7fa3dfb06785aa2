"""Standby and wake: an idle sandbox freezes itself; the next request through the gate thaws it.

Idle means: no request reached it through the one gate (``server/gate.py``: exec, files, PTY,
process and port streams, envd, MCP) and no connection the gate handed out is still open, for
``standby_after`` seconds (per sandbox at create; else ``SHOAL_STANDBY_AFTER``; 0 = never). Then it is
paused keeping its memory (a cgroup freeze: processes stop, RAM stays, CPU goes to zero) with the
reason ``STANDBY``; after ``SHOAL_STANDBY_FILESYSTEM_AFTER`` seconds of idleness (0 = never) a ``disk``
sandbox is paused to its filesystem too (its RAM freed; waking it boots it again from its files).

Why the default is 0 (never): a sandbox may be busy with no traffic at all (a build, a crawler, a
server that only talks outwards); freezing it by surprise would stop work the user is waiting for.
Standby is opt-in, per daemon or per sandbox; E2B's ``autoPause`` + ``autoResume`` map onto it.

Only a pause made here (or by E2B's auto-pause with ``autoResume``) is undone by traffic: its reason
starts with ``standby:``. A sandbox the user paused stays paused until the user resumes it.

Sandbox code can keep its own sandbox awake (an agent that never closes a connection the host
opened): that only costs what running costs; it can never wake another sandbox or make one sleep.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING

from shoal.engine.limits import LIMITS
from shoal.engine.models import PauseMode, SandboxRecord, SandboxState
from shoal.errors import InvalidRequest, InvalidTransition, ShoalError

if TYPE_CHECKING:
    from shoal.engine.engine import Engine

log = logging.getLogger("shoal.standby")
#: The reason of a standby pause; traffic wakes a sandbox paused with a reason that starts with ``WAKE_MARK``.
WAKE_MARK = "standby:"
STANDBY = "standby: no traffic for a while; the next request wakes it"
AUTO_RESUME = "standby: paused at its timeout (autoResume); the next request wakes it"
ENV_AFTER = "SHOAL_STANDBY_AFTER"
ENV_FILESYSTEM_AFTER = "SHOAL_STANDBY_FILESYSTEM_AFTER"
DEFAULT_AFTER = 0.0
#: A sandbox woken after its expiry passed (E2B's auto-pause at the timeout, then auto-resume) gets this
#: long again, or the reaper would delete it right after the request that woke it.
WAKE_TIMEOUT = 300.0


def check_standby_after(value: object) -> float | None:
    """None (the daemon's default) or 0 (never) up to the longest timeout, in seconds."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= LIMITS.timeout.high:
        raise InvalidRequest(f"standby_after must be between 0 (never) and {int(LIMITS.timeout.high)} seconds, "
                             f"not {value!r}")
    return float(value)


def wakes_on_traffic(rec: SandboxRecord) -> bool:
    """True for a sandbox that standby (not its user) paused: the next request resumes it."""
    return rec.state is SandboxState.PAUSED and (rec.reason or "").startswith(WAKE_MARK)


def _env_seconds(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest(f"{name} must be a number of seconds, not {raw!r}") from None
    return check_standby_after(value) or 0.0


class Standby:
    """Traffic bookkeeping and the standby loop of one daemon (one per ``Gate``)."""

    EVERY = 0.5

    def __init__(self, engine: Engine, after: float | None = None, filesystem_after: float | None = None) -> None:
        self.engine = engine
        self.after = _env_seconds(ENV_AFTER, DEFAULT_AFTER) if after is None else after
        self.filesystem_after = (_env_seconds(ENV_FILESYSTEM_AFTER, 0.0) if filesystem_after is None
                                 else filesystem_after)
        self._last: dict[str, float] = {}
        self._open: dict[str, weakref.WeakSet] = {}
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    # --- traffic (called by the gate, on the event loop) ----------------------------------------
    def touch(self, sandbox_id: str) -> None:
        self._last[sandbox_id] = time.monotonic()

    def hold(self, sandbox_id: str, transport: object) -> None:
        """A connection to the sandbox's agent is open: it stays awake until ``transport`` closes."""
        self.touch(sandbox_id)
        self._open.setdefault(sandbox_id, weakref.WeakSet()).add(transport)

    def busy(self, sandbox_id: str) -> bool:
        return any(not t.is_closing() for t in list(self._open.get(sandbox_id, ())))

    def wake(self, rec: SandboxRecord) -> SandboxRecord:
        """Resume a sandbox standby paused (freeze: a thaw; filesystem: a new boot from its files); any
        other record is returned as it is. A resume that lost a race to another waker is fine."""
        if not wakes_on_traffic(rec):
            return rec
        self.touch(rec.id)
        try:
            if rec.expires_at is not None and rec.expires_at < time.time() + WAKE_TIMEOUT:
                self.engine.set_timeout(rec.id, WAKE_TIMEOUT)  # before it runs: the reaper deletes expired ones
            return self.engine.resume(rec.id)
        except InvalidTransition:
            return self.engine.get(rec.id)

    # --- the loop ------------------------------------------------------------------------------
    def after_for(self, rec: SandboxRecord) -> float:
        return self.after if rec.standby_after is None else rec.standby_after

    def idle_for(self, sandbox_id: str, now: float) -> float:
        if self.busy(sandbox_id):
            self._last[sandbox_id] = now
        return now - self._last.setdefault(sandbox_id, now)  # first seen: the clock starts now

    def tick(self, now: float | None = None) -> list[tuple[str, str]]:
        """Put idle sandboxes to standby; returns ``(id, "memory"|"filesystem")`` for each one paused."""
        now = time.monotonic() if now is None else now
        done = []
        records = self.engine.list()
        for sid in set(self._last) - {r.id for r in records}:  # deleted: forget them
            self._last.pop(sid, None)
            self._open.pop(sid, None)
        for rec in records:
            after = self.after_for(rec)
            if after <= 0:
                continue
            if rec.state is SandboxState.RUNNING:
                decided = now
                if self.idle_for(rec.id, now) < after:
                    continue
                if self._pause(rec.id, PauseMode.MEMORY, STANDBY):
                    done.append((rec.id, PauseMode.MEMORY.value))
                    if self._last.get(rec.id, 0) > decided or self.busy(rec.id):  # traffic raced the freeze
                        self.wake(self.engine.get(rec.id))
            elif (rec.state is SandboxState.PAUSED and rec.reason == STANDBY and self.filesystem_after > 0
                  and rec.pause_mode == PauseMode.MEMORY.value and rec.layer == "disk"
                  and self.idle_for(rec.id, now) >= max(self.filesystem_after, after)):
                if self._pause(rec.id, PauseMode.FILESYSTEM, STANDBY):
                    done.append((rec.id, PauseMode.FILESYSTEM.value))
        return done

    def _pause(self, sandbox_id: str, mode: PauseMode, reason: str) -> bool:
        try:
            self.engine.pause(sandbox_id, mode=mode, reason=reason)
        except ShoalError as exc:
            log.info("standby skipped", extra={"sandbox": sandbox_id, "error": exc.message})
            return False
        log.info("sandbox in standby", extra={"sandbox": sandbox_id, "mode": mode.value})
        return True

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="shoal-standby", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.EVERY):
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - must outlive any single failure
                log.exception("standby failed")
