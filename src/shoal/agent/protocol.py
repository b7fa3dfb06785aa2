"""The wire contract between the host and the in-sandbox agent, in one place.

Transport: a unix stream socket. The host makes the listening socket in a host-only directory and
hands it to the agent as fd 3 (``crun --preserve-fds``), so the socket path is never visible
inside the sandbox. One connection carries one operation.

Framing: every frame is ``kind (1 byte) | length (4 bytes, big endian) | payload``.

* ``MSG``    a JSON object: the request (first frame the host sends), events, the final reply.
* ``STDIN``  raw bytes for the process' stdin (or PTY input), host → agent.
* ``STDOUT`` / ``STDERR`` / ``PTY``  raw process output, agent → host; never re-encoded, so
  non-UTF-8 output and MiBs of it pass untouched.
* ``DATA``   raw file contents, either direction.

A request is ``{"op": <name>, ...}``. Every operation ends with a ``MSG`` that has either
``"ok": true`` (plus results) or ``"error": {"code", "message"}``; codes are listed in
``ERROR_CODES`` and mapped to host exceptions in ``shoal.errors.from_agent_error``.

This module must import nothing heavier than builtins: the agent is PID 1 of every sandbox and
its start-up is on the critical path of sandbox creation. ``json`` (via ``re`` and ``enum``) costs
more than the rest of the agent's imports together, so the C accelerator ``_json`` is used directly.
"""

from __future__ import annotations

import _json
import _struct

MSG = 0
STDIN = 1
STDOUT = 2
STDERR = 3
PTY = 4
DATA = 5

HEADER_SIZE = 5
MAX_FRAME = 16 * 1024 * 1024
CHUNK = 64 * 1024

_header = _struct.Struct("!BI")
pack_header = _header.pack
unpack_header = _header.unpack

#: Error codes an agent may answer with (mirrored from Connect/gRPC names that E2B also uses).
ERROR_CODES = (
    "not_found", "already_exists", "invalid_argument", "permission_denied",
    "resource_exhausted", "internal",
)


class _ScanContext:
    """The attributes ``_json.make_scanner`` reads; equals ``json.JSONDecoder()`` defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo: dict = {}

    @staticmethod
    def parse_constant(name: str) -> float:
        return {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}[name]


_scan = _json.make_scanner(_ScanContext())
_encode = _json.make_encoder(None, None, _json.encode_basestring_ascii, None, ":", ",", False, False, True)


def dumps(obj: object) -> bytes:
    """Compact JSON bytes for ``obj`` (dicts, lists, str, int, float, bool, None)."""
    return "".join(_encode(obj, 0)).encode("ascii")


def loads(data: bytes | str) -> object:
    """Parse one JSON value that fills ``data`` exactly."""
    text = data.decode("utf-8") if isinstance(data, (bytes, bytearray, memoryview)) else data
    try:
        value, end = _scan(text, 0)
    except StopIteration as exc:
        raise ValueError("invalid JSON") from exc
    if end != len(text):
        raise ValueError("trailing data after JSON value")
    return value


def frame(kind: int, payload: bytes) -> bytes:
    """One frame, ready to send."""
    return pack_header(kind, len(payload)) + payload


def message(obj: dict) -> bytes:
    """A ``MSG`` frame holding ``obj`` as JSON."""
    return frame(MSG, dumps(obj))


def error_reply(code: str, text: str) -> dict:
    return {"error": {"code": code, "message": text}}


class FrameReader:
    """Blocking frame reader over anything with ``recv_into`` (a socket).

    Kept buffer-based (one ``recv_into`` fills many small frames) because per-frame syscalls are
    what dominates an exec round trip.
    """

    def __init__(self, sock) -> None:  # noqa: ANN001 - socket or _socket.socket
        self._sock = sock
        self._buf = bytearray()
        self._chunk = bytearray(CHUNK)
        self._view = memoryview(self._chunk)

    def _fill(self, need: int) -> bool:
        while len(self._buf) < need:
            n = self._sock.recv_into(self._view)
            if not n:
                return False
            self._buf += self._view[:n]
        return True

    def read(self) -> tuple[int, bytes] | None:
        """The next ``(kind, payload)``, or None at a clean end of stream."""
        if not self._fill(HEADER_SIZE):
            if self._buf:
                raise ConnectionError("connection closed inside a frame header")
            return None
        kind, length = unpack_header(bytes(self._buf[:HEADER_SIZE]))
        if length > MAX_FRAME:
            raise ConnectionError(f"frame of {length} bytes exceeds the {MAX_FRAME} limit")
        if not self._fill(HEADER_SIZE + length):
            raise ConnectionError("connection closed inside a frame")
        payload = bytes(self._buf[HEADER_SIZE:HEADER_SIZE + length])
        del self._buf[:HEADER_SIZE + length]
        return kind, payload

    def take_buffered(self) -> bytes:
        """Hand over bytes read past the last frame (when a connection switches to raw bytes)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def buffered(self) -> bool:
        """True if a whole frame header is already buffered (no syscall needed to start it)."""
        return len(self._buf) >= HEADER_SIZE
