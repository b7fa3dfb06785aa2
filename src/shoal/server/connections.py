"""Who may hold a connection to the daemon, and for how long, before proving anything.

uvicorn on its own waits forever for a request's headers and accepts connections until the
process runs out of file descriptors; then nothing, not even ``/health``, is answered. API
clients are not trusted beyond their key and anyone on the network can connect, so:

* headers must be complete ``header_timeout`` seconds after a request starts (or after the
  connection opens), give or take the guard's sweep interval: a connection that trickles them
  (slowloris) or sends nothing is closed;
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
import math
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
    """The open HTTP connections of one server, oldest first, and which one to give up when full.

    The header deadline is enforced by a sweep every ``tick`` seconds (a quarter of the deadline, at
    most a second) rather than by a timer per request: a request then costs the guard nothing but
    the connection's admission, which is what keeps ``/health`` as fast as without the guard. A
    connection seen waiting for the same request's headers at ``strikes`` consecutive sweeps has
    waited at least the deadline and is closed: so headers get between ``header_timeout`` and
    ``header_timeout + tick`` seconds.
    """

    def __init__(self, max_connections: int, header_timeout: float) -> None:
        self.max_connections = max_connections
        self.header_timeout = header_timeout
        self.tick = min(1.0, header_timeout / 4)
        self.strikes = math.ceil(header_timeout / self.tick - 1e-9)
        self.open: dict[GuardedHttpProtocol, None] = {}  # insertion order = age
        self.evicted = 0
        self.refused = 0
        self._sweeper: asyncio.TimerHandle | None = None

    def admit(self, conn: GuardedHttpProtocol) -> bool:
        """Register ``conn``; make room by evicting if over the cap. False: ``conn`` itself was refused."""
        self.open[conn] = None
        if self._sweeper is None:
            self._sweeper = conn.loop.call_later(self.tick, self._sweep, conn.loop)
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
            in_request = conn.in_request()
            if not conn.authenticated:
                if not in_request:
                    return conn
                if body is None and not conn.body_complete():
                    body = conn
            elif idle is None and not in_request:
                idle = conn
        return body or idle

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        """Close the connections that have waited ``strikes`` sweeps for one request's headers."""
        late = []
        for conn in self.open:
            waiting = conn.waiting_for()
            if waiting is None:
                conn.seen_waiting, conn.strikes = None, 0
            elif waiting is conn.seen_waiting:
                conn.strikes += 1
                if conn.strikes >= self.strikes:
                    late.append(conn)
            else:
                conn.seen_waiting, conn.strikes = waiting, 0
        for conn in late:
            self.drop(conn)
        self._sweeper = loop.call_later(self.tick, self._sweep, loop) if self.open else None

    def drop(self, conn: GuardedHttpProtocol) -> None:
        """Close ``conn`` now (abort: there is nothing worth flushing) and stop counting it."""
        self.open.pop(conn, None)
        conn.abort()

    def forget(self, conn: GuardedHttpProtocol) -> None:
        self.open.pop(conn, None)


#: What ``GuardedHttpProtocol.waiting_for`` answers for a connection that has not begun a request.
_NOTHING_YET: dict = {}


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol under a ``ConnectionGuard``.

    Where a connection stands (waiting for headers, in a request, body complete) is read from
    uvicorn's own per-request state when the guard asks, not tracked by parser callbacks: a callback
    override is a Python call per request (per header, for ``on_header``) on the daemon's hottest
    path. The one override per request is ``on_headers_complete``, for the ``shoal.reset`` extension
    and, until the connection is authenticated, for noticing a key.
    """

    guard: ConnectionGuard  # set on the subclass ``protocol_class`` makes

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.authenticated = False
        self.seen_waiting: object = None  # the guard's sweep: what this connection waited for last time
        self.strikes = 0
        self._reset = {"reset": self.reset}

    # where the connection stands, from uvicorn's state --------------------------------------
    def waiting_for(self) -> object:
        """The request (its scope) whose headers are not complete yet, ``_NOTHING_YET`` before the first
        byte of a request, or None: headers complete, or an idle keep-alive connection (uvicorn's
        keep-alive timeout governs that)."""
        scope = self.scope
        if scope is None:
            return _NOTHING_YET
        cycle = self.cycle
        if cycle is None or cycle.scope is not scope:
            return scope
        return None

    def in_request(self) -> bool:
        """Headers complete and the response not yet."""
        cycle = self.cycle
        return cycle is not None and cycle.scope is self.scope and not cycle.response_complete

    def body_complete(self) -> bool:
        cycle = self.cycle
        return cycle is None or cycle.scope is not self.scope or not cycle.more_body

    # connection ----------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.guard.admit(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.forget(self)
        super().connection_lost(exc)

    def abort(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def reset(self) -> None:
        """Drop the connection with a TCP reset. Offered to the app as the ASGI extension ``shoal.reset``:
        a response cut short by a close after part of a chunked body reads to some HTTP clients (pyqwest,
        under E2B's async SDK) as a protocol error, a reset to all of them as the transport failing, which
        is what a sandbox dying under a stream must look like."""
        if self.transport is None or self.transport.is_closing():
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.transport.abort()

    def handle_websocket_upgrade(self) -> None:
        self.guard.forget(self)  # the WebSocket protocol owns the connection from here on
        super().handle_websocket_upgrade()

    # the one parser callback ---------------------------------------------------------------
    def on_headers_complete(self) -> None:
        self.scope["extensions"] = {"shoal.reset": self._reset}  # type: ignore[typeddict-unknown-key]
        super().on_headers_complete()
        if not self.authenticated:
            cycle = self.cycle
            if cycle is not None and cycle.scope is self.scope and any(
                    name in _KEY_HEADERS for name, _ in self.headers):
                cycle.send = self._watch_status(cycle.send)  # type: ignore[method-assign]

    def _watch_status(self, send: Callable[..., Any]) -> Callable[..., Any]:
        async def watched(message: Any) -> None:
            if message.get("type") == "http.response.start" and int(message.get("status", 500)) < 400:
                self.authenticated = True
            await send(message)
        return watched


def protocol_class(guard: ConnectionGuard) -> type[GuardedHttpProtocol]:
    """A ``GuardedHttpProtocol`` bound to ``guard``, for ``uvicorn.Config(http=...)``."""
    return type("ShoalHttpProtocol", (GuardedHttpProtocol,), {"guard": guard})
