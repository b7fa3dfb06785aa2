"""E2B compatibility: the official ``e2b`` SDKs work against the Shoal daemon unchanged.

* ``control``: the control plane (``/sandboxes``, ``/v2/sandboxes``), a FastAPI router on the daemon's app
* ``envd``: envd (port 49983): Connect process/filesystem services, ``/files``, ``/health``
* ``interpreter`` (when present): the code interpreter (port 49999)
* ``shoal.server.portproxy``: any other sandbox port (``get_host``)
* ``security``: the per-sandbox access tokens that guard all sandbox traffic

``SandboxRouting`` (``shoal.server.sandbox_routing``) sends sandbox traffic to these by the
``E2b-Sandbox-Id``/``E2b-Sandbox-Port`` headers or ``Host: <port>-<id>.<domain>``.
"""

from __future__ import annotations

import json

from shoal.server.e2b.security import Tokens, header, unavailable
from shoal.server.gate import Gate

ENVD_VERSION = "0.6.4"


async def _json(send, status: int, message: str) -> None:  # noqa: ANN001
    body = json.dumps({"code": status, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class NoInterpreter:
    """Port 49999 until a code interpreter app is installed: 404 JSON."""

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 4404})
            return
        await _json(send, 404, "no code interpreter in this daemon")


class SandboxGuard:
    """Admit sandbox traffic only with the sandbox's ``X-Access-Token`` or its traffic token
    (``E2B-Traffic-Access-Token``: the code interpreter SDK sends only that one on its /contexts
    calls), and only to a running sandbox (else 502 "... was not found", as E2B's proxy says)."""

    def __init__(self, app, gate: Gate) -> None:  # noqa: ANN001
        self.app, self.gate, self.engine = app, gate, gate.engine
        self.tokens = Tokens.of(gate.engine.settings.state_dir)

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        sid = scope["shoal.sandbox_id"]
        ok = (self.tokens.check_envd(sid, header(scope, b"x-access-token"))
              or self.tokens.check_traffic(sid, header(scope, b"e2b-traffic-access-token")))
        problem = None if ok else (401, "invalid or missing X-Access-Token / E2B-Traffic-Access-Token")
        if problem is None:
            message = unavailable(self.gate, sid)
            problem = None if message is None else (502, message)
        if problem is not None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 4000 + problem[0]})
            else:
                await _json(send, *problem)
            return
        return await self.app(scope, receive, send)


def interpreter_app(gate: Gate):  # noqa: ANN201
    """The code interpreter ASGI app if this build has one, else ``NoInterpreter``; guarded."""
    try:
        from shoal.server.e2b.interpreter import InterpreterApp  # type: ignore[import-not-found]
    except ModuleNotFoundError as exc:
        if exc.name != "shoal.server.e2b.interpreter":
            raise
        return SandboxGuard(NoInterpreter(), gate)
    return SandboxGuard(InterpreterApp(gate), gate)
