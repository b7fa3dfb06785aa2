"""The hot path: ``POST /v1/sandboxes/{id}/exec`` answered without FastAPI's machinery.

A plain exec is what agents do most, and FastAPI's routing plus dependency solving cost about
1 ms per request on this 2-core machine, more than the exec itself. This ASGI middleware answers
exactly the non-streamed, foreground exec with the same validation (the pydantic model), the
same auth, the same errors and the same JSON as the FastAPI route (which still serves every
other variant and documents the endpoint in OpenAPI); anything else passes through untouched.
How the output is bounded, encoded and abandoned is ``plain_exec.py``, shared with that route.
It sits in front of the FastAPI app (``app.create_asgi``), not inside its middleware stack, so it
answers an unexpected failure with the same JSON 500 as the app's handler of last resort.
"""

from __future__ import annotations

import logging
import re
import time

from pydantic import ValidationError

from shoal.errors import ShoalError
from shoal.server.asgi import send_json
from shoal.server.auth import key_from_headers
from shoal.server.models import ExecRequest
from shoal.server.plain_exec import PlainExec, send_result
from shoal.server.routes.processes import _start_request

log = logging.getLogger("shoal.server")
_EXEC = re.compile(r"^/v1/sandboxes/([^/]+)/exec$")
_STREAM_TYPES = (b"text/event-stream", b"application/x-ndjson")
MAX_BODY = 1024 * 1024


class _Headers(dict):
    def get(self, key: str, default: str | None = None) -> str | None:  # case-insensitive like Starlette
        return super().get(key.lower(), default)


class ExecFastPath:
    def __init__(self, app, gate, metrics) -> None:  # noqa: ANN001
        self.app, self.gate, self.engine, self.metrics = app, gate, gate.engine, metrics

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        match = _EXEC.match(scope["path"])
        if match is None:
            return await self.app(scope, receive, send)
        raw_headers = scope["headers"]
        for name, value in raw_headers:
            if name == b"accept" and any(t in value for t in _STREAM_TYPES):
                return await self.app(scope, receive, send)
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY:
                return await send_json(send, 413, {"code": "invalid_request", "message": "request body too large"})
        try:
            req = ExecRequest.model_validate_json(body)
        except ValidationError:
            return await self._replay(scope, body, receive, send)  # let FastAPI phrase the 400
        if req.stream or req.background or req.stdin_open:
            return await self._replay(scope, body, receive, send)
        started = time.perf_counter()
        job = None
        answered = False
        try:
            headers = _Headers({k.decode("latin-1"): v.decode("latin-1") for k, v in raw_headers})
            key = key_from_headers(headers, self.engine)
            sandbox_id = match.group(1)
            agent = self.gate.agent(sandbox_id, key)
            job = PlainExec(lambda: self.engine.runtime.oom_kills(sandbox_id))
            stdin = req.stdin.encode() if req.stdin is not None else None
            result = await job.run(agent, _start_request(req), stdin, stdin is not None, receive)
            if result is None:  # the caller went away; its agent connection is closed already
                return None
            self.metrics.exec_seconds.observe(time.perf_counter() - started)
            answered = True
            await send_result(send, result)
        except ShoalError as exc:
            exc = self.gate.explain(match.group(1), exc)
            return await send_json(send, exc.status, exc.to_dict())
        except Exception as exc:  # noqa: BLE001 - in front of FastAPI: its handler of last resort is not here
            if answered:
                raise  # the answer had begun: uvicorn cuts the connection
            log.exception("unexpected error")
            return await send_json(send, 500, {"code": "internal", "message": f"internal error: {type(exc).__name__}"})
        finally:
            if job is not None:
                job.release()

    async def _replay(self, scope, body: bytes, receive, send) -> None:  # noqa: ANN001
        """Hand the request on with the body we already read; later receives (disconnect
        detection of streamed answers) go to the real connection."""
        sent = False

        async def replay():  # noqa: ANN202
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()
        await self.app(scope, replay, send)


