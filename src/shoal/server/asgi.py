"""The one way raw ASGI code (fast path, port proxy, envd, interpreter, routing) answers with JSON.

FastAPI routes answer through ``server/errors.py``; the parts of the daemon that sit in front of
FastAPI for speed or protocol reasons speak ASGI directly, and they all answer the same way here.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def encode(payload: object) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


async def send_json(send: Send, status: int, payload: object, headers: list[tuple[bytes, bytes]] | None = None
                    ) -> None:
    """A whole JSON response: status, content type and length, body."""
    data = encode(payload)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": data})


async def refuse(scope: MutableMapping[str, Any], send: Send, status: int, payload: object) -> None:
    """Refuse an HTTP request with JSON, or a WebSocket with close code ``4000 + status`` (before accept)."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 4000 + status})
    else:
        await send_json(send, status, payload)
