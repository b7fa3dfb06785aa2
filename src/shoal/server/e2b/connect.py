"""The Connect protocol (connectrpc.com/docs/protocol), JSON codec only, as plain ASGI helpers.

* Unary: ``POST /<pkg>.<Service>/<Method>`` with ``Content-Type: application/json``; the answer is
  200 + the JSON message, or an error status + ``{"code": "<connect code>", "message"}``.
* Streams (server and client streaming): ``Content-Type: application/connect+json``; every message
  travels in an envelope ``flags (1 byte) | length (4 bytes, big endian) | JSON``. A server stream
  answers 200 with exactly ``application/connect+json`` and ends with an envelope whose flags
  have bit 0x02 set, carrying ``{}`` or ``{"error": {"code", "message"}}``.
* ``Connect-Timeout-Ms`` is the caller's deadline for the whole call.

proto3 JSON rules the callers follow: lowerCamelCase names, bytes as base64, enums by name,
64-bit integers as strings, default values may be omitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable

from shoal.errors import (
    CapacityExceeded,
    Conflict,
    Forbidden,
    InvalidRequest,
    InvalidTransition,
    NotFound,
    QuotaExceeded,
    ShoalError,
    Unauthorized,
)
from shoal.server.asgi import send_json
from shoal.server.e2b import bounded_json

UNARY_TYPE = "application/json"
STREAM_TYPE = "application/connect+json"
END_STREAM = 0x02
COMPRESSED = 0x01
MAX_MESSAGE = 16 * 1024 * 1024
_HEADER = struct.Struct("!BI")

#: Connect code → HTTP status of a unary error answer (the protocol's table).
STATUS = {
    "canceled": 499, "unknown": 500, "invalid_argument": 400, "deadline_exceeded": 504, "not_found": 404,
    "already_exists": 409, "permission_denied": 403, "resource_exhausted": 429, "failed_precondition": 400,
    "aborted": 409, "out_of_range": 400, "unimplemented": 501, "internal": 500, "unavailable": 503,
    "data_loss": 500, "unauthenticated": 401,
}


class ConnectError(Exception):
    """An error answered in Connect's shape (code is one of ``STATUS``)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


def from_shoal(exc: ShoalError) -> ConnectError:
    """The Connect code for one of our errors."""
    if isinstance(exc, NotFound):
        code = "not_found"
    elif isinstance(exc, InvalidTransition):
        code = "failed_precondition"
    elif isinstance(exc, Conflict):
        code = "already_exists"
    elif isinstance(exc, InvalidRequest):
        code = "invalid_argument"
    elif isinstance(exc, Forbidden):
        code = "permission_denied"
    elif isinstance(exc, Unauthorized):
        code = "unauthenticated"
    elif isinstance(exc, CapacityExceeded | QuotaExceeded):
        code = "resource_exhausted"
    else:
        code = "internal"
    return ConnectError(code, exc.message)


def envelope(obj: dict | bytes, flags: int = 0) -> bytes:
    data = obj if isinstance(obj, bytes) else json.dumps(obj, separators=(",", ":")).encode()
    return _HEADER.pack(flags, len(data)) + data


def end_frame(error: ConnectError | None = None) -> bytes:
    return envelope({"error": error.to_dict()} if error is not None else {}, END_STREAM)


def timeout_seconds(headers: dict[str, str]) -> float | None:
    """The ``Connect-Timeout-Ms`` deadline in seconds, or None."""
    raw = headers.get("connect-timeout-ms")
    if not raw:
        return None
    try:
        ms = int(raw)
    except ValueError:
        return None
    return ms / 1000 if ms > 0 else None


async def read_body(receive: Callable[[], Awaitable[dict]], limit: int = MAX_MESSAGE) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectError("canceled", "the client went away")
        body += message.get("body", b"")
        if len(body) > limit + 5:
            raise ConnectError("resource_exhausted", f"request larger than {limit} bytes")
        if not message.get("more_body", False):
            return bytes(body)


def decode_message(raw: bytes, what: str) -> dict:
    """One JSON message, through the facade's bounded parser (depth, size, no NaN): a hostile
    message is ``invalid_argument``, never a RecursionError."""
    try:
        return bounded_json.loads_object(raw, what, max_bytes=MAX_MESSAGE)
    except bounded_json.BadJson as exc:
        raise ConnectError("invalid_argument", f"{what}: {exc}") from exc


def decode_unary(body: bytes) -> dict:
    return decode_message(body, "request")


def decode_envelopes(data: bytes | bytearray) -> tuple[list[tuple[int, dict]], int]:
    """Complete envelopes at the start of ``data`` as (flags, message), and how many bytes they used."""
    out: list[tuple[int, dict]] = []
    pos = 0
    while len(data) - pos >= 5:
        flags, length = _HEADER.unpack_from(data, pos)
        if length > MAX_MESSAGE:
            raise ConnectError("resource_exhausted", "message too large")
        if len(data) - pos - 5 < length:
            break
        if flags & COMPRESSED:
            raise ConnectError("unimplemented", "compressed messages are not supported")
        raw = bytes(data[pos + 5:pos + 5 + length])
        pos += 5 + length
        out.append((flags, decode_message(raw, "message")))
    return out, pos


def decode_single_envelope(body: bytes) -> dict:
    """The one request message of a server-streaming call."""
    messages, used = decode_envelopes(body)
    if not messages or used != len(body):
        raise ConnectError("invalid_argument", "expected exactly one enveloped request message")
    return messages[0][1]


async def client_messages(receive: Callable[[], Awaitable[dict]]) -> AsyncIterator[dict]:
    """The messages of a client stream, as they arrive."""
    buf = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ConnectError("canceled", "the client went away")
        buf += message.get("body", b"")
        msgs, used = decode_envelopes(buf)
        del buf[:used]
        for flags, obj in msgs:
            if flags & END_STREAM:
                return
            yield obj
        if not message.get("more_body", False):
            if buf:
                raise ConnectError("invalid_argument", "truncated message at the end of the request")
            return


async def send_unary(send: Callable[[dict], Awaitable[None]], obj: dict) -> None:
    await send_json(send, 200, obj, content_type=UNARY_TYPE.encode())


async def send_unary_error(send: Callable[[dict], Awaitable[None]], err: ConnectError) -> None:
    await send_json(send, STATUS.get(err.code, 500), err.to_dict(), content_type=UNARY_TYPE.encode())


class ServerStream:
    """The answer of a streaming call: 200 + envelopes + the end envelope. ``send_message`` after the
    client left raises ``ConnectError("canceled")``."""

    def __init__(self, send: Callable[[dict], Awaitable[None]], scope: dict | None = None) -> None:
        self._send = send
        self.started = False
        self.closed = False
        #: the server's ``shoal.reset`` extension (server/connections.py), if it offers one
        self._reset = ((scope or {}).get("extensions") or {}).get("shoal.reset", {}).get("reset")

    async def _start(self) -> None:
        if not self.started:
            self.started = True
            await self._send({"type": "http.response.start", "status": 200,
                              "headers": [(b"content-type", STREAM_TYPE.encode())]})

    async def send_message(self, obj: dict) -> None:
        await self._start()
        try:
            await self._send({"type": "http.response.body", "body": envelope(obj), "more_body": True})
        except OSError as exc:  # uvicorn: the connection is gone
            raise ConnectError("canceled", "the client went away") from exc

    async def abort(self) -> None:
        """Drop the response without its end envelope: the caller then returns without finishing the
        ASGI response, and the server closes the connection mid-body. A client sees the transport fail,
        as when a sandbox dies under a real envd (E2B's SDKs then check whether the sandbox still runs
        and say it was killed); an end envelope, even an error one, would read as envd's own answer."""
        if self.closed:
            return
        self.closed = True
        await self._start()
        if self._reset is not None:
            self._reset()  # a TCP reset: every client reads it as the transport failing

    async def end(self, error: ConnectError | None = None) -> None:
        if self.closed:
            return
        self.closed = True
        await self._start()
        with contextlib.suppress(OSError):
            await self._send({"type": "http.response.body", "body": end_frame(error), "more_body": False})


async def wait_disconnect(receive: Callable[[], Awaitable[dict]]) -> None:
    """Returns when the client closes the connection (call only after the body was read)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class Deadline:
    """A monotonic deadline from ``Connect-Timeout-Ms`` (None: no limit)."""

    def __init__(self, seconds: float | None) -> None:
        self.at = time.monotonic() + seconds if seconds else None

    def remaining(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    async def run(self, coro: Awaitable) -> object:  # noqa: ANN401
        left = self.remaining()
        if left is None:
            return await coro
        try:
            return await asyncio.wait_for(coro, left)
        except TimeoutError as exc:
            raise ConnectError("deadline_exceeded", "the call's deadline (Connect-Timeout-Ms) passed") from exc
