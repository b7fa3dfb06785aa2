"""Streamed answers as NDJSON (default) or Server-Sent Events, chosen by the Accept header."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import StreamingResponse

from shoal.errors import ShoalError

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"


def wants_stream(request: Request, flag: bool | None) -> str | None:
    accept = request.headers.get("accept", "")
    if SSE in accept:
        return SSE
    if NDJSON in accept or flag:
        return NDJSON
    return None


def process_event(kind: str, data: bytes | dict) -> dict:
    """One process event in wire form: output as base64 ``data`` (byte-exact) plus ``text``."""
    if kind == "end":
        assert isinstance(data, dict)
        return {"type": "end", "exit_code": data["exit_code"], "signal": data.get("signal"),
                "timed_out": bool(data.get("timed_out"))}
    assert isinstance(data, bytes)
    return {"type": kind, "data": base64.b64encode(data).decode(), "text": data.decode("utf-8", "replace")}


def respond(events: AsyncIterator[dict], media: str, on_close=None) -> StreamingResponse:  # noqa: ANN001
    def encode(ev: dict) -> bytes:
        line = json.dumps(ev, separators=(",", ":"))
        if media == SSE:
            return f"event: {ev.get('type', 'message')}\ndata: {line}\n\n".encode()
        return line.encode() + b"\n"

    async def body() -> AsyncIterator[bytes]:
        try:
            async for ev in events:
                yield encode(ev)
        except ShoalError as exc:  # headers are sent: the failure becomes the stream's last event
            yield encode({"type": "error", **exc.to_dict()})
        finally:
            if on_close is not None:
                on_close()
    return StreamingResponse(body(), media_type=media, headers={"Cache-Control": "no-cache"})
