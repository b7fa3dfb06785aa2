"""Traffic addressed to a sandbox rather than to the daemon, recognised before any route.

* ``E2b-Sandbox-Id`` / ``E2b-Sandbox-Port`` headers (how the E2B SDKs reach a sandbox through
  ``E2B_SANDBOX_URL``): port 49983 is envd (processes and files), 49999 the code interpreter,
  any other port is proxied to that port inside the sandbox.
* ``Host: <port>-<id>.<domain>`` (what ``get_host(port)`` returns): proxied to the port.

The sub-apps find the target in ``scope["shoal.sandbox_id"]`` and ``scope["shoal.port"]``.
Everything else goes to the daemon's own app unchanged. Routing decides nothing about access:
each sub-app checks its own credentials (envd and the interpreter the sandbox's tokens, the port
proxy ``shoal.server.port_access``), so no path reaches a sandbox unchecked.
"""

from __future__ import annotations

import re

ENVD_PORT = 49983
INTERPRETER_PORT = 49999
_HOST = re.compile(rb"^(\d{1,5})-([a-z][a-z0-9]{0,31})\.")


class SandboxRouting:
    def __init__(self, app, envd, interpreter, proxy) -> None:  # noqa: ANN001
        self.app, self.envd, self.interpreter, self.proxy = app, envd, interpreter, proxy

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        sandbox_id = port = host = None
        for name, value in scope["headers"]:
            if name == b"e2b-sandbox-id":
                sandbox_id = value.decode("latin-1")
            elif name == b"e2b-sandbox-port":
                port = value
            elif name == b"host":
                host = value
        if sandbox_id is not None:
            try:
                number = int(port) if port is not None else ENVD_PORT
            except ValueError:
                number = -1
            scope = {**scope, "shoal.sandbox_id": sandbox_id, "shoal.port": number}
            if number == ENVD_PORT:
                return await self.envd(scope, receive, send)
            if number == INTERPRETER_PORT:
                return await self.interpreter(scope, receive, send)
            return await self.proxy(scope, receive, send)
        if host is not None:
            match = _HOST.match(host)
            if match is not None:
                scope = {**scope, "shoal.sandbox_id": match.group(2).decode(), "shoal.port": int(match.group(1))}
                if scope["shoal.port"] == ENVD_PORT:
                    return await self.envd(scope, receive, send)
                if scope["shoal.port"] == INTERPRETER_PORT:
                    return await self.interpreter(scope, receive, send)
                return await self.proxy(scope, receive, send)
        return await self.app(scope, receive, send)
