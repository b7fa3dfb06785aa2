"""The transparent egress proxy: where domain policy meets ports 80 and 443.

An address admitted for an allowed name may be shared (a CDN, a cloud load balancer) with sites the
policy does not allow, so on 80/443 the name the client asks for must be an allowed one too. nftables
DNATs those connections of a sandbox with domain rules (firewall.py, ``px_<n>``) to this listener on the
gateway address; it reads the first bytes (the HTTP request head, or the TLS ClientHello), takes the
Host header or the SNI, asks ``decide`` (network.py: the sandbox's policy, the addresses the resolver
admitted for it), and then connects to the original destination (``SO_ORIGINAL_DST``) and splices.
For plain HTTP it also sets the headers of the policy's ``rules`` (and ``Connection: close``, so every
request on a kept-alive connection is checked, not just the first).

Everything the sandbox sends is hostile: the head is bounded (``MAX_HEAD``), it must arrive within
``HEAD_TIMEOUT`` (in all, not per read), a source address has at most ``PER_PEER_PENDING`` heads in
flight, a sandbox holds at most ``PER_SANDBOX`` proxied connections and the process
``TOTAL``; idle connections are closed after ``IDLE_TIMEOUT``. Refusals are an HTTP 403 with the reason,
or a TLS ``access_denied`` alert. Every process of an instance that creates sandboxes binds the same
port with ``SO_REUSEPORT`` (like the resolver) and reads the policy from disk, so any of them serves.
"""

from __future__ import annotations

import hashlib
import logging
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("shoal.net.egress_proxy")
MAX_HEAD = 16 * 1024
HEAD_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
IDLE_TIMEOUT = 300.0
PER_SANDBOX = 64
#: Connections one source address may hold before its head is read and its sandbox known: without it, one
#: sandbox that opens connections and dribbles their heads takes all of ``TOTAL`` from every other one.
PER_PEER_PENDING = 32
TOTAL = 512
SO_ORIGINAL_DST = 80  # same number for SOL_IP and SOL_IPV6 (IP6T_SO_ORIGINAL_DST)
TLS_ALERT_ACCESS_DENIED = b"\x15\x03\x01\x00\x02\x02\x31"


def proxy_port(instance: str) -> int:
    """The instance's proxy port on its gateway address: fixed by its name, so every process agrees."""
    return 40000 + int.from_bytes(hashlib.sha256(b"shoal-egress:" + instance.encode()).digest()[:4], "big") % 20000


@dataclass(frozen=True)
class Decision:
    allow: bool
    reason: str = ""
    key: object = None  # the sandbox, for the per-sandbox connection count
    headers: tuple[tuple[str, str], ...] | None = None


#: (peer address, original destination, its port, Host/SNI or None, is TLS) -> Decision
Decide = Callable[[str, str, int, "str | None", bool], Decision]


def sni(hello: bytes) -> str | None:
    """The server name of a TLS ClientHello record (one record), or None."""
    try:
        if hello[0] != 0x16 or hello[5] != 0x01:
            return None
        p = 5 + 4 + 2 + 32
        p += 1 + hello[p]                                        # session id
        p += 2 + struct.unpack_from("!H", hello, p)[0]           # cipher suites
        p += 1 + hello[p]                                        # compression methods
        end = p + 2 + struct.unpack_from("!H", hello, p)[0]
        p += 2
        while p + 4 <= end:
            ext, length = struct.unpack_from("!HH", hello, p)
            p += 4
            if ext == 0:  # server_name: list length, then (type, length, name)
                kind, nlen = hello[p + 2], struct.unpack_from("!H", hello, p + 3)[0]
                name = hello[p + 5:p + 5 + nlen]
                return name.decode("ascii").lower() if kind == 0 and len(name) == nlen else None
            p += length
    except (IndexError, struct.error, UnicodeDecodeError):
        return None
    return None


def http_host(head: bytes) -> str | None:
    """The Host header (without a port) of a request head, or None."""
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"host":
            host = value.strip().decode("ascii", "replace").lower()
            if host.startswith("["):
                return host[1:].partition("]")[0]
            return host.rpartition(":")[0] if host.count(":") == 1 else host
    return None


def rewrite_head(head: bytes, headers: tuple[tuple[str, str], ...] | None) -> bytes:
    """The request head with the rule's headers set (replacing the client's of the same name) and
    ``Connection: close``."""
    lines = head[:-4].split(b"\r\n")
    drop = {b"connection", b"keep-alive", b"proxy-connection"} | {k.lower().encode() for k, _ in headers or ()}
    kept = [lines[0]] + [ln for ln in lines[1:] if ln.partition(b":")[0].strip().lower() not in drop]
    kept += [f"{k}: {v}".encode() for k, v in headers or ()] + [b"Connection: close"]
    return b"\r\n".join(kept) + b"\r\n\r\n"


class EgressProxy:
    def __init__(self, addresses: list[str], port: int, decide: Decide) -> None:
        self.addresses, self.port, self.decide = addresses, port, decide
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._per_key: dict[object, int] = {}
        self._pending: dict[str, int] = {}  # connections per source address whose head is not read yet
        self._total = threading.BoundedSemaphore(TOTAL)
        self._closed = False

    def start(self) -> None:
        for addr in self.addresses:
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            s = socket.socket(family, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((addr, self.port))
                s.listen(128)
            except OSError:
                s.close()
                self.close()
                raise
            self._socks.append(s)
            threading.Thread(target=self._accept, args=(s,), name="shoal-egress", daemon=True).start()

    def close(self) -> None:
        self._closed = True
        socks, self._socks = self._socks, []
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def _accept(self, listener: socket.socket) -> None:
        while not self._closed:
            try:
                conn, peer = listener.accept()
            except OSError:
                return
            with self._lock:
                if self._pending.get(peer[0], 0) >= PER_PEER_PENDING:
                    conn.close()  # this address has enough heads in flight already
                    continue
                self._pending[peer[0]] = self._pending.get(peer[0], 0) + 1
            if not self._total.acquire(blocking=False):
                self._head_done(peer[0])
                conn.close()  # flooded: the client sees a reset
                continue
            threading.Thread(target=self._serve, args=(conn, peer[0]), name="shoal-egress-conn", daemon=True).start()

    def _head_done(self, peer: str) -> None:
        with self._lock:
            left = self._pending.get(peer, 0) - 1
            if left > 0:
                self._pending[peer] = left
            else:
                self._pending.pop(peer, None)

    def _serve(self, conn: socket.socket, peer: str) -> None:
        key = None
        pending = True
        try:
            conn.settimeout(HEAD_TIMEOUT)
            dst, port = self._original_destination(conn)
            try:
                head, tls = self._read_head(conn)
            finally:
                pending = False
                self._head_done(peer)
            conn.settimeout(HEAD_TIMEOUT)  # _read_head left the head's remaining time on it
            if head is None:
                return
            name = sni(head) if tls else http_host(head)
            decision = self.decide(peer, dst, port, name, tls)
            if decision.allow:
                with self._lock:
                    if self._per_key.get(decision.key, 0) >= PER_SANDBOX:
                        decision = Decision(False, f"more than {PER_SANDBOX} proxied connections at once")
                    else:
                        key = decision.key
                        self._per_key[key] = self._per_key.get(key, 0) + 1
            if not decision.allow:
                log.info("egress refused: %s -> %s:%s (%s): %s", peer, dst, port, name, decision.reason)
                self._refuse(conn, tls, decision.reason)
                return
            if not tls:  # the body's first bytes follow the head unchanged
                end = head.index(b"\r\n\r\n") + 4
                head = rewrite_head(head[:end], decision.headers) + head[end:]
            family = socket.AF_INET6 if ":" in dst else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as up:
                up.settimeout(CONNECT_TIMEOUT)
                up.connect((dst, port))
                up.sendall(head)
                self._splice(conn, up)
        except (OSError, ValueError):
            pass
        finally:
            if pending:
                self._head_done(peer)
            if key is not None:
                with self._lock:
                    left = self._per_key[key] - 1
                    if left:
                        self._per_key[key] = left
                    else:
                        del self._per_key[key]
            conn.close()
            self._total.release()

    @staticmethod
    def _original_destination(conn: socket.socket) -> tuple[str, int]:
        if conn.family == socket.AF_INET6:
            raw = conn.getsockopt(socket.SOL_IPV6, SO_ORIGINAL_DST, 28)
            return socket.inet_ntop(socket.AF_INET6, raw[8:24]), struct.unpack_from("!H", raw, 2)[0]
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        return socket.inet_ntoa(raw[4:8]), struct.unpack_from("!H", raw, 2)[0]

    @staticmethod
    def _read_head(conn: socket.socket) -> tuple[bytes | None, bool]:
        """The TLS record holding the ClientHello, or the HTTP request head (through its blank line), all
        within ``HEAD_TIMEOUT`` (one deadline for the whole head, not per read)."""
        deadline = time.monotonic() + HEAD_TIMEOUT

        def recv(n: int) -> bytes:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request head took too long")
            conn.settimeout(left)
            return conn.recv(n)
        data = b""
        while len(data) < 5:
            chunk = recv(5 - len(data))
            if not chunk:
                return None, False
            data += chunk
        if data[0] == 0x16:
            need = 5 + struct.unpack_from("!H", data, 3)[0]
            if need > MAX_HEAD:
                return None, True
            while len(data) < need:
                chunk = recv(need - len(data))
                if not chunk:
                    return None, True
                data += chunk
            return data, True
        while b"\r\n\r\n" not in data:
            if len(data) >= MAX_HEAD:
                conn.sendall(b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\n"
                             b"Content-Length: 0\r\n\r\n")
                return None, False
            chunk = recv(MAX_HEAD - len(data))
            if not chunk:
                return None, False
            data += chunk
        return data, False

    @staticmethod
    def _refuse(conn: socket.socket, tls: bool, reason: str) -> None:
        try:
            if tls:
                conn.sendall(TLS_ALERT_ACCESS_DENIED)
            else:
                body = f"refused by the sandbox's egress policy: {reason}\n".encode()
                conn.sendall(b"HTTP/1.1 403 Forbidden\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                             b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        except OSError:
            pass

    @staticmethod
    def _splice(a: socket.socket, b: socket.socket) -> None:
        """Copy both ways until both are done or nothing moves for IDLE_TIMEOUT; half-closes pass through."""
        a.setblocking(False)
        b.setblocking(False)
        sel = selectors.DefaultSelector()
        peers = {a: b, b: a}
        open_ = {a, b}
        for s in open_:
            sel.register(s, selectors.EVENT_READ)
        try:
            while open_:
                events = sel.select(IDLE_TIMEOUT)
                if not events:
                    return
                for key, _ in events:
                    src = key.fileobj
                    try:
                        data = src.recv(65536)
                    except BlockingIOError:
                        continue
                    if not data:
                        sel.unregister(src)
                        open_.discard(src)
                        try:
                            peers[src].shutdown(socket.SHUT_WR)
                        except OSError:
                            pass
                        continue
                    dst = peers[src]
                    dst.setblocking(True)
                    dst.settimeout(IDLE_TIMEOUT)
                    try:
                        dst.sendall(data)
                    finally:
                        dst.setblocking(False)
        finally:
            sel.close()
