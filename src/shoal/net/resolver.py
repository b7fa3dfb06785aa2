"""Shoal's DNS resolver for its sandboxes: UDP on the gateway address, forwarding to the host's.

Every sandbox's ``/etc/resolv.conf`` names it, and the firewall lets a sandbox reach nothing else of
the host. It is the hook for domain policy (``on_answer``: egress.py admits the answers for a sandbox's
allowed names into its nftables set before the answer reaches it), so each query is parsed here, not
relayed blind. Sandbox input is hostile:
anything that does not parse as one DNS question is dropped, each upstream answer must come from the
upstream's address and carry the query's id, and at most ``WORKERS`` queries are in flight.

Every process of an instance that creates sandboxes (the daemon; a test run's in-process engine) binds
the same address with ``SO_REUSEPORT``: the kernel spreads queries over them, and one exiting leaves the
others serving.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

log = logging.getLogger("shoal.net.resolver")
MAX_QUERY = 4096
UPSTREAM_TIMEOUT = 2.0
WORKERS = 16


class Resolver:
    def __init__(self, address: str, upstreams: list[str], allowed: ipaddress.IPv4Network) -> None:
        self.address, self.upstreams, self.allowed = address, upstreams, allowed
        self._sock: socket.socket | None = None
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="shoal-dns")
        self._slots = threading.BoundedSemaphore(WORKERS * 4)
        #: ``local(query, asker) -> reply | None``: names Shoal answers itself (private networks' members).
        self.local: Callable[[bytes, str], bytes | None] | None = None
        #: ``on_answer(asker, reply)``: called with each upstream answer before the asker gets it (egress
        #: policy admits the addresses of allowed names into the asker's nftables set here).
        self.on_answer: Callable[[str, bytes], None] | None = None

    def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((self.address, 53))
        self._sock = sock
        threading.Thread(target=self._serve, name="shoal-dns", daemon=True).start()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _serve(self) -> None:
        sock = self._sock
        while sock is not None and self._sock is sock:
            try:
                data, peer = sock.recvfrom(MAX_QUERY)
            except OSError:
                return
            if not peer:  # the socket was shut down
                return
            try:
                if ipaddress.ip_address(peer[0]) not in self.allowed or not self._slots.acquire(blocking=False):
                    continue  # not one of ours, or flooded: drop, the client retries
            except ValueError:
                continue
            try:
                self._pool.submit(self._answer, sock, data, peer)
            except RuntimeError:
                self._slots.release()
                return

    def _answer(self, sock: socket.socket, data: bytes, peer: tuple) -> None:
        try:
            reply = self.local(data, peer[0]) if self.local else None
            if reply is None:
                reply = self.resolve(data)
                if reply is not None and self.on_answer is not None:
                    self.on_answer(peer[0], reply)
            if reply is not None:
                sock.sendto(reply, peer)
        except OSError:
            pass
        finally:
            self._slots.release()

    def resolve(self, data: bytes) -> bytes | None:
        """The upstream's answer to one query, or SERVFAIL; None for input that is not a DNS query."""
        from dnslib import DNSError, DNSRecord

        try:
            query = DNSRecord.parse(data)
        except (DNSError, Exception):  # noqa: BLE001 - dnslib raises assorted errors on garbage
            return None
        if query.header.qr or len(query.questions) != 1:
            return None
        for upstream in self.upstreams:
            reply = self._ask(upstream, data, query.header.id)
            if reply is not None:
                return reply
        fail = query.reply()
        fail.header.rcode = 2  # SERVFAIL
        return fail.pack()

    @staticmethod
    def _ask(upstream: str, data: bytes, qid: int) -> bytes | None:
        family = socket.AF_INET6 if ":" in upstream else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:  # a fresh random port per query
            s.settimeout(UPSTREAM_TIMEOUT)
            try:
                s.connect((upstream, 53))  # connected: the kernel drops datagrams from anyone else
                s.send(data)
                while True:
                    reply = s.recv(65535)
                    if len(reply) >= 12 and int.from_bytes(reply[:2], "big") == qid:
                        return reply
            except OSError:
                return None
