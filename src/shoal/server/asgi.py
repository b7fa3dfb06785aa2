"""The one way raw ASGI code (fast path, port proxy, envd, interpreter, routing) answers with JSON.

FastAPI routes answer through ``server/errors.py``; the parts of the daemon that sit in front of
FastAPI for speed or protocol reasons speak ASGI directly, and they all answer the same way here:
``send_json`` for a whole answer, ``error`` for the ``{"code": <int status>, "message"}`` shape the
sandbox-traffic side (E2B's proxy, envd, the port proxy) answers with, ``refuse`` for a request that
may be a WebSocket. One encoder, so every raw answer is the same compact JSON.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]
Receive = Callable[[], Awaitable[Message]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def encode(payload: object) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def header(scope: Scope, name: bytes) -> str | None:
    """The first value of request header ``name`` (lower case bytes, as ASGI gives them), or None."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


async def send_json(send: Send, status: int, payload: object, headers: list[tuple[bytes, bytes]] | None = None,
                    content_type: bytes = b"application/json") -> None:
    """A whole JSON response: status, content type and length, body."""
    data = encode(payload)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


async def error(send: Send, status: int, message: str) -> None:
    """``{"code": <status>, "message": ...}``: the integer-code error shape of sandbox traffic."""
    await send_json(send, status, {"code": status, "message": message})


async def refuse(scope: Scope, send: Send, status: int, payload: object) -> None:
    """Refuse an HTTP request with JSON, or a WebSocket with close code ``4000 + status`` (before accept)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 4000 + status})
    else:
        await send_json(send, status, payload)
