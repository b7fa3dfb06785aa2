"""API keys on every request but health: ``Authorization: Bearer <key>`` or ``X-API-Key``."""

from __future__ import annotations

from fastapi import Request

from shoal.engine.keys import ApiKey
from shoal.errors import Unauthorized


def key_from_headers(request_headers, engine) -> ApiKey:  # noqa: ANN001
    raw = request_headers.get("x-api-key")
    if not raw:
        auth = request_headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            raw = auth[7:].strip()
    if not raw:
        raise Unauthorized("missing API key (Authorization: Bearer <key> or X-API-Key)")
    key = engine.keys.verify(raw)
    if key is None:
        raise Unauthorized("invalid or revoked API key")
    return key


async def api_key(request: Request) -> ApiKey:
    """FastAPI dependency: the caller's key."""
    return key_from_headers(request.headers, request.app.state.engine)
