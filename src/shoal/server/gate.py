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

from dataclasses import dataclass

from shoal.engine import Engine, SandboxRecord, SandboxState
from shoal.engine.engine import unusable
from shoal.engine.keys import ApiKey
from shoal.errors import NotFound, RuntimeFailure, ShoalError
from shoal.runtime.agent_aio import AsyncAgentClient


@dataclass(frozen=True)
class SandboxToken:
    """The bearer proved (by a per-sandbox token) that it may use ``sandbox_id``, and only it."""

    sandbox_id: str


Credential = ApiKey | SandboxToken


class Gate:
    """From (sandbox id, credential) to the sandbox's record or agent; one instance per daemon."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def record(self, sandbox_id: str, credential: Credential) -> SandboxRecord:
        """The sandbox, in any state, if ``credential`` may see it; else ``NotFound``."""
        if isinstance(credential, SandboxToken):
            if credential.sandbox_id != sandbox_id:
                raise NotFound(f"sandbox {sandbox_id} does not exist")
            return self.engine.get(sandbox_id)
        return self.engine.get(sandbox_id, credential)

    def usable(self, sandbox_id: str, credential: Credential) -> SandboxRecord:
        """The sandbox if it can take requests now; else the one error that says why not."""
        rec = self.record(sandbox_id, credential)
        if rec.state is not SandboxState.RUNNING:
            raise unusable(rec)
        return rec

    def agent(self, sandbox_id: str, credential: Credential) -> AsyncAgentClient:
        """The agent of a usable sandbox (its answers are still hostile input: see ``AsyncAgentClient``)."""
        self.usable(sandbox_id, credential)
        return AsyncAgentClient(str(self.engine.runtime.agent_socket(sandbox_id)), sandbox_id)

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
