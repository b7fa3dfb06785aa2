"""Traffic addressed to a sandbox rather than to the daemon, recognised before any route.

* ``Host: <port>-<id>.<domain>`` (what ``get_host(port)`` returns, and what a native client may
  use just the same): the port inside the sandbox.
* whatever a wing adds through ``SandboxAddressing``: the E2B wing (``e2b/wing.py``) addresses by
  its ``E2b-Sandbox-Id`` / ``E2b-Sandbox-Port`` headers and serves ports 49983 (envd) and 49999
  (the code interpreter) itself.

A port no wing serves goes to the port proxy. The sub-apps find the target in
``scope["shoal.sandbox_id"]`` and ``scope["shoal.port"]``; ``scope["shoal.via"]`` says how it was
addressed (``"host"`` or the wing's name): only Host-addressed traffic may reach a public port
without a credential (``port_access``). Everything else goes to the daemon's own app unchanged.
Routing decides nothing about access: each sub-app checks its own credentials, so no path reaches a
sandbox unchecked.

This module imports nothing from ``server/e2b``: native sandboxes' ports work without the wing.
"""

from __future__ import annotations

import re
from typing import Protocol

from shoal.errors import NotFound, ShoalError
from shoal.runtime.agent_aio import AsyncAgentClient
from shoal.server.asgi import ASGIApp, Receive, Scope, Send
from shoal.server.gate import Gate, SandboxToken

_HOST = re.compile(rb"^(\d{1,5})-([a-z][a-z0-9]{0,31})\.")
HOST = "host"


class SandboxAddressing(Protocol):
    """What a wing adds to sandbox routing."""

    name: str

    def address(self, scope: Scope) -> tuple[str, int] | None:
        """(sandbox id, port) when the request is addressed to a sandbox in the wing's own way."""

    def service(self, port: int) -> ASGIApp | None:
        """The app that serves ``port`` of every sandbox instead of the port proxy, if any."""


def by_host(scope: Scope) -> tuple[str, int] | None:
    """(sandbox id, port) from ``Host: <port>-<id>.<domain>``."""
    for name, value in scope["headers"]:
        if name == b"host":
            match = _HOST.match(value)
            return None if match is None else (match.group(2).decode(), int(match.group(1)))
    return None


def traffic_agent(gate: Gate, sid: str) -> tuple[AsyncAgentClient | None, str | None]:
    """The agent for sandbox traffic to ``sid`` (its credential already checked), through the one gate,
    or why it cannot be served, in the words E2B's SDKs look for ("was not found" means not running to
    them). Exactly one of the two is None."""
    try:
        return gate.agent(sid, SandboxToken(sid)), None
    except NotFound:
        return None, f"The sandbox {sid} was not found"
    except ShoalError as exc:
        hint = " (connect to resume it)" if "paused" in exc.message else ""
        return None, f"The sandbox {sid} was not found: {exc.message}{hint}"


class SandboxRouting:
    def __init__(self, app: ASGIApp, proxy: ASGIApp, wings: tuple[SandboxAddressing, ...] = ()) -> None:
        self.app, self.proxy, self.wings = app, proxy, wings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        for wing in self.wings:
            target = wing.address(scope)
            if target is not None:
                return await self._to(scope, receive, send, target, wing.name)
        target = by_host(scope)
        if target is not None:
            return await self._to(scope, receive, send, target, HOST)
        return await self.app(scope, receive, send)

    async def _to(self, scope: Scope, receive: Receive, send: Send, target: tuple[str, int], via: str) -> None:
        sid, port = target
        scope = {**scope, "shoal.sandbox_id": sid, "shoal.port": port, "shoal.via": via}
        for wing in self.wings:
            app = wing.service(port)
            if app is not None:
                return await app(scope, receive, send)
        return await self.proxy(scope, receive, send)
