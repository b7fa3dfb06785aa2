"""Sandbox ports exposed on host ports (``shoal expose ID PORT``): for tools that cannot set a Host header.

The daemon listens on ``bind:host_port`` (loopback unless the owner says otherwise) and relays each
connection to the sandbox port through the agent's ``port.connect``, like the port proxy does. Why the
agent and not the sandbox's address: it reaches services bound to the sandbox's loopback only (most dev
servers), it works with ``SHOAL_NET=0``, and it needs no hole in the "nothing starts a connection into a
sandbox" rule of the firewall. The agent may be an impostor; all it can do is answer its own bytes to a
connection the owner asked for.

* Only the owner's key exposes or unexposes (it is an explicit act of the owner; the port proxy's
  public/traffic settings do not apply). Host ports below 1024 are refused (the daemon runs as root),
  ``bind`` must be an IP address of this host; a port in use (by anything) is 409.
* At most ``MAX_CONNECTIONS`` relayed connections per exposure at once; more are closed on accept.
  Every connection passes the gate again: a paused, failed or deleted sandbox gets none.
* Kept in ``<state>/exposed-ports.json``: a restarted daemon (also after SIGKILL) listens again at start
  for every exposure whose sandbox still exists, and forgets the others. Delete (and expiry) closes the
  listener and forgets it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import json
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass
from pathlib import Path

from shoal.engine.models import SandboxEvent
from shoal.errors import Conflict, InvalidRequest, NotFound, ShoalError
from shoal.server.gate import Credential, Gate, SandboxToken

log = logging.getLogger("shoal.exposed_ports")
MAX_CONNECTIONS = 64
MAX_PER_SANDBOX = 16
MIN_HOST_PORT = 1024
READ_SIZE = 256 * 1024
FILE = "exposed-ports.json"


@dataclass(frozen=True)
class Exposure:
    sandbox_id: str
    port: int
    host_port: int
    bind: str

    def to_dict(self) -> dict:
        return asdict(self)


def check_request(port: int, host_port: int | None, bind: str) -> tuple[int, int, str]:
    if not isinstance(port, int) or not 0 < port < 65536:
        raise InvalidRequest(f"invalid port {port}: must be 1-65535")
    if host_port is not None and (not isinstance(host_port, int) or not MIN_HOST_PORT <= host_port < 65536):
        raise InvalidRequest(f"invalid host port {host_port}: must be {MIN_HOST_PORT}-65535")
    try:
        addr = ipaddress.ip_address(bind)
    except ValueError:
        raise InvalidRequest(f"bind must be an IP address of this host, not {bind[:64]!r}") from None
    return port, host_port or 0, str(addr)


class ExposedPorts:
    """The daemon's exposed ports: listeners, the file that remembers them, their end on delete."""

    def __init__(self, gate: Gate) -> None:
        self.gate, self.engine = gate, gate.engine
        self.path = Path(self.engine.settings.state_dir) / FILE
        self._servers: dict[tuple[str, int], tuple[Exposure, asyncio.Server, asyncio.Semaphore]] = {}
        self._lock = asyncio.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unsubscribe = None

    # --- the file -------------------------------------------------------------------------------
    def _load(self) -> list[Exposure]:
        try:
            data = json.loads(self.path.read_text())
            return [Exposure(str(d["sandbox_id"]), int(d["port"]), int(d["host_port"]), str(d["bind"]))
                    for d in data if isinstance(d, dict)]
        except (OSError, ValueError, KeyError, TypeError):
            return []

    def _save(self) -> None:
        tmp = self.path.with_name(f".{FILE}.{os.getpid()}")
        tmp.write_text(json.dumps([e.to_dict() for e, _, _ in self._servers.values()]))
        os.chmod(tmp, 0o600)
        os.replace(tmp, self.path)

    # --- lifecycle ------------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, _app: object) -> AsyncIterator[None]:
        """Listen again for every remembered exposure whose sandbox still exists; close all at shutdown
        (the file keeps them for the next start)."""
        self._loop = asyncio.get_running_loop()
        self._unsubscribe = self.engine.subscribe(self._on_event)
        async with self._lock:
            for e in self._load():
                if self.engine.store.get(e.sandbox_id) is None:
                    continue
                try:
                    await self._listen(e)
                except ShoalError as exc:
                    log.warning("cannot expose %s:%s again: %s", e.sandbox_id, e.port, exc.message)
            self._save()
        try:
            yield
        finally:
            if self._unsubscribe:
                self._unsubscribe()
            for _, server, _ in list(self._servers.values()):
                server.close()

    def _on_event(self, event: dict) -> None:
        if event.get("type") == SandboxEvent.DELETED.value and self._loop is not None:
            sid = str(event["sandbox"]["id"])
            with contextlib.suppress(RuntimeError):  # the loop is closed: the daemon is stopping
                asyncio.run_coroutine_threadsafe(self.forget(sid), self._loop)

    async def forget(self, sandbox_id: str) -> None:
        """Close and forget every exposure of ``sandbox_id`` (it was deleted)."""
        async with self._lock:
            gone = [k for k, (e, _, _) in self._servers.items() if e.sandbox_id == sandbox_id]
            for k in gone:
                self._servers.pop(k)[1].close()
            if gone:
                self._save()

    # --- the API --------------------------------------------------------------------------------
    def list(self, sandbox_id: str, credential: Credential) -> list[Exposure]:
        self.gate.record(sandbox_id, credential)
        return [e for e, _, _ in self._servers.values() if e.sandbox_id == sandbox_id]

    async def expose(self, sandbox_id: str, credential: Credential, port: int, host_port: int | None = None,
                     bind: str = "127.0.0.1") -> Exposure:
        port, wanted, bind = check_request(port, host_port, bind)
        self.gate.record(sandbox_id, credential)  # the owner's: another key's sandbox does not exist
        async with self._lock:
            mine = [e for e, _, _ in self._servers.values() if e.sandbox_id == sandbox_id]
            if any(e.port == port for e in mine):
                raise Conflict(f"port {port} of sandbox {sandbox_id} is exposed already")
            if len(mine) >= MAX_PER_SANDBOX:
                raise Conflict(f"at most {MAX_PER_SANDBOX} exposed ports per sandbox")
            exposure = await self._listen(Exposure(sandbox_id, port, wanted, bind))
            if self.engine.store.get(sandbox_id) is None:  # deleted while we listened
                self._servers.pop((exposure.bind, exposure.host_port))[1].close()
                raise NotFound(f"sandbox {sandbox_id} does not exist")
            self._save()
        return exposure

    async def unexpose(self, sandbox_id: str, credential: Credential, port: int) -> None:
        self.gate.record(sandbox_id, credential)
        async with self._lock:
            for k, (e, server, _) in list(self._servers.items()):
                if e.sandbox_id == sandbox_id and e.port == port:
                    del self._servers[k]
                    server.close()
                    self._save()
                    return
        raise NotFound(f"port {port} of sandbox {sandbox_id} is not exposed")

    # --- listening and relaying ----------------------------------------------------------------
    async def _listen(self, e: Exposure) -> Exposure:
        """Start the listener (caller holds the lock); 409 when the host port is taken."""
        if e.host_port and (e.bind, e.host_port) in self._servers:
            raise Conflict(f"host port {e.host_port} on {e.bind} is in use")
        sem = asyncio.Semaphore(MAX_CONNECTIONS)
        holder: dict[str, Exposure] = {}

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await self._relay(holder["e"], sem, reader, writer)
        try:
            server = await asyncio.start_server(handle, e.bind, e.host_port, reuse_address=True, backlog=128)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise Conflict(f"host port {e.host_port} on {e.bind} is in use") from None
            if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                raise InvalidRequest(f"{e.bind} is not an address of this host") from None
            raise InvalidRequest(f"cannot listen on {e.bind}:{e.host_port}: {exc.strerror}") from None
        actual = Exposure(e.sandbox_id, e.port, server.sockets[0].getsockname()[1], e.bind)
        holder["e"] = actual
        self._servers[(actual.bind, actual.host_port)] = (actual, server, sem)
        return actual

    async def _relay(self, e: Exposure, sem: asyncio.Semaphore, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        if sem.locked():
            writer.close()  # bounded: MAX_CONNECTIONS at once per exposure
            return
        async with sem:
            try:
                agent = self.gate.agent(e.sandbox_id, SandboxToken(e.sandbox_id))  # running, and still exists
                up_reader, up_writer = await agent.open_port(e.port)
            except (ShoalError, OSError) as exc:
                log.info("exposed port %s of %s: %s", e.port, e.sandbox_id, getattr(exc, "message", exc))
                writer.close()
                return
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
                writer.close()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy until ``src`` ends, then half-close ``dst``."""
    try:
        while data := await src.read(READ_SIZE):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (OSError, ConnectionError, RuntimeError):
        dst.close()
