"""E2B's ``autoPause``: sandboxes created with it are paused, not deleted, when their timeout comes.

A thread pauses them ``LEAD`` seconds before the daemon's reaper (once a second, ``Engine.expire``,
which leaves paused sandboxes alone) would delete them; ``connect`` resumes them. The thread starts
with the first such sandbox (or at daemon start when one exists). The setting lives in the daemon's
one ``SandboxOptions`` store, beside the port publicity; the one ``AutoPause`` is the E2B wing's.
"""

from __future__ import annotations

import logging
import threading
import time

from shoal.engine import Engine, SandboxState
from shoal.engine.standby import AUTO_RESUME
from shoal.errors import ShoalError
from shoal.server.sandbox_options import SandboxOptions

log = logging.getLogger("shoal.e2b")
OPTION = "autoPause"
#: E2B's ``lifecycle.auto_resume``: the pause at the timeout is a standby (``engine/standby.py``), which the
#: next request through the gate undoes; without it only ``connect``/resume does.
RESUME_OPTION = "autoResume"
#: E2B's ``lifecycle.on_timeout.keep_memory=False`` (``autoPauseMemory: false``): the pause at the timeout
#: is filesystem-only (every process stopped, memory freed; resume cold-boots; traffic never wakes it).
FILESYSTEM_OPTION = "autoPauseFilesystem"


class AutoPause:
    LEAD = 1.5
    EVERY = 0.25

    def __init__(self, engine: Engine, options: SandboxOptions) -> None:
        self.engine, self.options = engine, options
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def enable(self, sandbox_id: str, auto_resume: bool = False, keep_memory: bool = True) -> None:
        """``sandbox_id`` pauses at its timeout from now on (``auto_resume``: traffic wakes it; not
        ``keep_memory``: the pause is filesystem-only)."""
        extra = {RESUME_OPTION: True} if auto_resume and keep_memory else {}
        if not keep_memory:
            extra[FILESYSTEM_OPTION] = True
        self.options.update(sandbox_id, **{OPTION: True, **extra})
        self.ensure()

    def resume_watch(self) -> None:
        """At daemon start: watch again if any existing sandbox asked for auto-pause."""
        if any(self.options.get(r.id).get(OPTION) for r in self.engine.list()):
            self.ensure()

    def ensure(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="e2b-autopause", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self.EVERY)
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - must outlive any single failure
                log.exception("auto-pause failed")

    def tick(self, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        paused = []
        for rec in self.engine.list(states={SandboxState.RUNNING}):
            if rec.expires_at is None or rec.expires_at - now > self.LEAD:
                continue
            options = self.options.get(rec.id)
            if not options.get(OPTION):
                continue
            try:
                if options.get(FILESYSTEM_OPTION):
                    self.engine.pause(rec.id, mode="filesystem")
                else:
                    self.engine.pause(rec.id, reason=AUTO_RESUME if options.get(RESUME_OPTION) else None)
                paused.append(rec.id)
                log.info("sandbox paused at its timeout (autoPause)", extra={"sandbox": rec.id})
            except ShoalError:
                pass
        return paused
