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


#: /proc/net/tcp{,6} are read up to this much each (a sandbox can open many sockets; the host bounds its
#: side again, since this process may be an impostor).
MAX_PROC_BYTES = 1 << 20
MAX_LISTENING = 1024
_LISTEN = "0A"


def _parse(text: str, family: int) -> list[dict]:
    out = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != _LISTEN:
            continue
        addr, _, port = fields[1].partition(":")
        try:
            raw = bytes.fromhex(addr)
            number = int(port, 16)
        except ValueError:
            continue
        # the kernel prints each 32-bit word in host (little-endian) order
        words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
        try:
            shown = _socket.inet_ntop(_socket.AF_INET if family == 4 else _socket.AF_INET6, words)
        except (OSError, ValueError):
            continue
        out.append({"port": number, "address": shown, "family": family})
    return out


def listening(sock, reader: p.FrameReader, req: dict) -> None:  # noqa: ANN001
    """``port.list``: the TCP ports something listens on in the sandbox's network namespace."""
    ports: list[dict] = []
    for path, family in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 6)):
        try:
            with open(path, "rb") as f:
                text = f.read(MAX_PROC_BYTES).decode("ascii", "replace")
        except OSError:
            continue
        ports += _parse(text, family)
    seen, unique = set(), []
    for entry in ports:
        key = (entry["port"], entry["address"])
        if key not in seen:
            seen.add(key)
            unique.append(entry)
    sock.sendall(p.message({"ok": True, "ports": unique[:MAX_LISTENING]}))
