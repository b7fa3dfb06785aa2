"""The one gate: the only way any request gets from (sandbox id, credential) to a usable agent.

REST routes, the exec fast path, MCP tools, PTY and process WebSockets, E2B's envd and code
interpreter, and the port proxy all pass through ``Gate``. It says, in one place, why a sandbox
cannot be used: unknown or another tenant's (404, indistinguishable on purpose), still being
created, paused, being deleted, failed (its agent died). Wake-from-standby and network checks hang
here too, so that nothing can bypass them.

A credential is either the caller's API key (the sandbox must be that key's) or a ``SandboxToken``:
proof, already checked by the caller (E2B's per-sandbox envd or traffic token), that the bearer may
use exactly one sandbox.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from shoal.engine import Engine, SandboxRecord, SandboxState
from shoal.engine.engine import unusable
from shoal.engine.keys import ApiKey
from shoal.engine.standby import Standby, wakes_on_traffic
from shoal.errors import NotFound, RuntimeFailure, ShoalError
from shoal.runtime.agent_aio import AsyncAgentClient, AsyncAgentConnection


@dataclass(frozen=True)
class SandboxToken:
    """The bearer proved (by a per-sandbox token) that it may use ``sandbox_id``, and only it."""

    sandbox_id: str


Credential = ApiKey | SandboxToken


class TrackedAgentClient(AsyncAgentClient):
    """The agent client the gate hands out: every connection it opens counts as traffic and keeps the
    sandbox out of standby until it closes (a stream, a PTY, a port connection)."""

    def __init__(self, socket_path: str, sandbox_id: str, standby: Standby) -> None:
        super().__init__(socket_path, sandbox_id)
        self._standby = standby

    async def connect(self) -> AsyncAgentConnection:
        conn = await super().connect()
        self._standby.hold(self.sandbox_id, conn.writer.transport)
        return conn


class Gate:
    """From (sandbox id, credential) to the sandbox's record or agent; one instance per daemon."""

    def __init__(self, engine: Engine, standby: Standby | None = None) -> None:
        self.engine = engine
        #: Traffic bookkeeping and wake-up (``engine/standby.py``); its loop is started by the app.
        self.standby = standby or Standby(engine)
        #: A sandbox's agent socket path is a function of its id: made once, not on every call.
        self._socket_path = functools.lru_cache(maxsize=4096)(lambda sid: str(engine.runtime.agent_socket(sid)))

    def record(self, sandbox_id: str, credential: Credential) -> SandboxRecord:
        """The sandbox, in any state, if ``credential`` may see it; else ``NotFound``."""
        if isinstance(credential, SandboxToken):
            if credential.sandbox_id != sandbox_id:
                raise NotFound(f"sandbox {sandbox_id} does not exist")
            return self.engine.get(sandbox_id)
        return self.engine.get(sandbox_id, credential)

    def usable(self, sandbox_id: str, credential: Credential) -> SandboxRecord:
        """The sandbox if it can take requests now; else the one error that says why not. A request is
        traffic: it resets the idle clock, and wakes a sandbox that standby (never its user) paused."""
        rec = self.record(sandbox_id, credential)
        self.standby.touch(sandbox_id)
        if wakes_on_traffic(rec):
            rec = self.standby.wake(rec)
        if rec.state is not SandboxState.RUNNING:
            raise unusable(rec)
        return rec

    def agent(self, sandbox_id: str, credential: Credential) -> AsyncAgentClient:
        """The agent of a usable sandbox (its answers are still hostile input: see ``AsyncAgentClient``)."""
        self.usable(sandbox_id, credential)
        return TrackedAgentClient(self._socket_path(sandbox_id), sandbox_id, self.standby)

    def explain(self, sandbox_id: str, exc: ShoalError) -> ShoalError:
        """The error to report when talking to a sandbox's agent failed with ``exc``.

        A request that passed the gate may lose its agent because the sandbox was deleted, paused or
        failed meanwhile (a delete during an upload, say): then the sandbox's state is the answer, not
        "lost the connection". Any other failure stays what it was. Call only after the gate admitted
        the caller (no tenancy check here)."""
        if not isinstance(exc, RuntimeFailure):
            return exc
        try:
            rec = self.engine.get(sandbox_id)
        except NotFound:
            return NotFound(f"sandbox {sandbox_id} was deleted while the request ran")
        return exc if rec.state is SandboxState.RUNNING else unusable(rec)
