"""``port.connect``: a TCP connection to a port inside the sandbox, relayed over the agent socket.

The sandbox's network namespace is its own (loopback only until networking lands), so the host
cannot dial into it; the agent can. After the ``ok`` reply the connection carries raw bytes both
ways, unframed, until either side closes. This is how the daemon exposes sandbox ports.
"""

from __future__ import annotations

import _socket
import select

from shoal.agent import protocol as p

BUFFER = 256 * 1024


def connect(sock, reader: p.FrameReader, req: dict) -> None:  # noqa: ANN001
    try:
        port = int(req.get("port", 0))
        if not 0 < port < 65536:
            raise ValueError
    except (TypeError, ValueError):
        sock.sendall(p.message(p.error_reply("invalid_argument", "port must be 1-65535")))
        return
    host = str(req.get("host") or "127.0.0.1")
    family = _socket.AF_INET6 if ":" in host else _socket.AF_INET
    tcp = _socket.socket(family, _socket.SOCK_STREAM, 0)
    try:
        tcp.settimeout(5)
        tcp.connect((host, port))
        tcp.settimeout(None)
    except OSError as exc:
        tcp.close()
        code = "not_found" if isinstance(exc, ConnectionRefusedError) else "internal"
        sock.sendall(p.message(p.error_reply(code, f"nothing accepts connections on port {port} in the sandbox"
                                             if code == "not_found" else f"cannot connect to port {port}: {exc}")))
        return
    sock.sendall(p.message({"ok": True}))
    try:
        leftover = reader.take_buffered()
        if leftover:
            tcp.sendall(leftover)
        _splice(sock, tcp)
    finally:
        tcp.close()


def _splice(a, b) -> None:  # noqa: ANN001
    """Copy bytes both ways; half-close each direction as its source ends."""
    poller = select.poll()
    fds = {a.fileno(): (a, b), b.fileno(): (b, a)}
    for fd in fds:
        poller.register(fd, select.POLLIN)
    open_dirs = 2
    while open_dirs:
        for fd, _ev in poller.poll():
            src, dst = fds[fd]
            try:
                data = src.recv(BUFFER)
            except OSError:
                data = b""
            if data:
                try:
                    dst.sendall(data)
                except OSError:
                    return
                continue
            poller.unregister(fd)
            open_dirs -= 1
            try:
                dst.shutdown(_socket.SHUT_WR)
            except OSError:
                pass
