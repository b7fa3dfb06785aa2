"""Who may hold a connection to the daemon, and for how long, before proving anything.

uvicorn on its own waits forever for a request's headers and accepts connections until the
process runs out of file descriptors; then nothing, not even ``/health``, is answered. API
clients are not trusted beyond their key and anyone on the network can connect, so:

* headers must be complete ``header_timeout`` seconds after a request starts (or after the
  connection opens): a connection that trickles them (slowloris) or sends nothing is closed;
* at most ``max_connections`` HTTP connections are open. A new connection beyond the cap evicts
  an old one that is doing nothing for anybody, cheapest to lose first: connections that never
  made an authenticated request and are not in a request, then such connections still sending a
  request body, then idle keep-alive connections of authenticated clients. Requests in flight of
  authenticated clients are never cut; if those are all there is, the new connection is refused.

So the newest connection, ``/health`` included, is always served while the cap holds, and the
daemon's fd count stays bounded. A connection counts as authenticated once a request of it that
carried a key (``Authorization`` or ``X-API-Key``) was answered with a status below 400.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import struct
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("shoal.connections")

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 4096
#: File descriptors kept for everything that is not a client connection: agent sockets (one per call in
#: flight), the store, logs, crun's pipes.
FD_RESERVE = 512
_KEY_HEADERS = (b"authorization", b"x-api-key")


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one (systemd's soft default, 1024, is far too low for a
    server); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft


def max_connections(fd_limit: int) -> int:
    """``SHOAL_MAX_CONNECTIONS``, else 4096, and never more than the fd limit leaves room for."""
    room = max(16, fd_limit - FD_RESERVE)
    raw = os.environ.get("SHOAL_MAX_CONNECTIONS")
    wanted = int(raw) if raw else DEFAULT_MAX_CONNECTIONS
    if wanted < 1:
        raise ValueError("SHOAL_MAX_CONNECTIONS must be at least 1")
    return min(wanted, room)


def header_timeout() -> float:
    raw = os.environ.get("SHOAL_HEADER_TIMEOUT")
    value = float(raw) if raw else DEFAULT_HEADER_TIMEOUT
    if value <= 0:
        raise ValueError("SHOAL_HEADER_TIMEOUT must be positive")
    return value


class ConnectionGuard:
    """The open HTTP connections of one server, oldest first, and which one to give up when full."""

    def __init__(self, max_connections: int, header_timeout: float) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.open: dict[GuardedHttpProtocol, None] = {}  # insertion order = age
        self.evicted = 0
        self.refused = 0

    def admit(self, conn: GuardedHttpProtocol) -> bool:
        """Register ``conn``; make room by evicting if over the cap. False: ``conn`` itself was refused."""
        self.open[conn] = None
        while len(self.open) > self.max_connections:
            victim = self._victim(conn)
            if victim is None:
                self.refused += 1
                self.drop(conn)
                return False
            self.evicted += 1
            self.drop(victim)
        return True

    def _victim(self, newcomer: GuardedHttpProtocol) -> GuardedHttpProtocol | None:
        body, idle = None, None
        for conn in self.open:
            if conn is newcomer:
                continue
            if not conn.authenticated:
                if not conn.in_request:
                    return conn
                if body is None and not conn.body_complete:
                    body = conn
            elif idle is None and not conn.in_request:
                idle = conn
        return body or idle

    def drop(self, conn: GuardedHttpProtocol) -> None:
        """Close ``conn`` now (abort: there is nothing worth flushing) and stop counting it."""
        self.open.pop(conn, None)
        conn.abort()

    def forget(self, conn: GuardedHttpProtocol) -> None:
        self.open.pop(conn, None)


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus a header deadline and a place under the ``ConnectionGuard``."""

    guard: ConnectionGuard  # set on the subclass ``protocol_class`` makes

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.authenticated = False
        self.in_request = False  # headers complete, response not yet
        self.body_complete = True
        self.headers_pending = True  # a request (or the connection) began and its headers are not complete
        self._deadline: asyncio.TimerHandle | None = None
        self._has_key = False

    # connection ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()
        self.guard.admit(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self.guard.forget(self)
        super().connection_lost(exc)

    def abort(self) -> None:
        self._disarm()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def reset(self) -> None:
        """Drop the connection with a TCP reset. Offered to the app as the ASGI extension ``shoal.reset``:
        a response cut short by a close after part of a chunked body reads to some HTTP clients (pyqwest,
        under E2B's async SDK) as a protocol error, a reset to all of them as the transport failing, which
        is what a sandbox dying under a stream must look like."""
        self._disarm()
        if self.transport is None or self.transport.is_closing():
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def handle_websocket_upgrade(self) -> None:
        self._disarm()
        self.guard.forget(self)  # the WebSocket protocol owns the connection from here on
        super().handle_websocket_upgrade()

    # the header deadline -------------------------------------------------------------------
    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.guard.header_timeout, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _headers_too_slow(self) -> None:
        self._deadline = None
        if self.headers_pending:
            self.guard.drop(self)

    # parser callbacks ----------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._has_key = False
        self.headers_pending = True
        self._arm()

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        if name.lower() in _KEY_HEADERS:
            self._has_key = True

    def on_headers_complete(self) -> None:
        self._disarm()
        self.scope.setdefault("extensions", {})["shoal.reset"] = {"reset": self.reset}  # type: ignore[typeddict-item]
        self.headers_pending = False
        self.in_request, self.body_complete = True, False
        super().on_headers_complete()
        cycle = self.cycle
        if cycle is not None and self._has_key and not self.authenticated:
            cycle.send = self._watch_status(cycle.send)  # type: ignore[method-assign]

    def on_message_complete(self) -> None:
        self.body_complete = True
        super().on_message_complete()

    def on_response_complete(self) -> None:
        self.in_request = False
        self.body_complete = True
        super().on_response_complete()

    def _watch_status(self, send: Callable[..., Any]) -> Callable[..., Any]:
        async def watched(message: Any) -> None:
            if message.get("type") == "http.response.start" and int(message.get("status", 500)) < 400:
                self.authenticated = True
            await send(message)
        return watched


def protocol_class(guard: ConnectionGuard) -> type[GuardedHttpProtocol]:
    """A ``GuardedHttpProtocol`` bound to ``guard``, for ``uvicorn.Config(http=...)``."""
    return type("ShoalHttpProtocol", (GuardedHttpProtocol,), {"guard": guard})
