"""The host side of the agent protocol for asyncio (the daemon): same operations as
``agent_client.AgentClient``, same error translation, no threads on the exec path.

The agent is sandbox code as far as the host is concerned (sandbox root can stop it, or take its
socket and answer in its place), so every frame length is checked before anything is allocated
and every wait for an answer is bounded: connecting and the first reply within ``AGENT_TIMEOUT``
(a distinct ``AgentUnavailable``, HTTP 503), one-reply calls within ``CALL_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Callable

from shoal.agent import protocol as p
from shoal.errors import AgentUnavailable, NotFound, RuntimeFailure
from shoal.runtime.agent_client import AGENT_TIMEOUT, CALL_TIMEOUT, ExecResult, check, frame_limit
from shoal.runtime.output_budget import CappedOutput, max_output

__all__ = ["AGENT_TIMEOUT", "CALL_TIMEOUT", "AsyncAgentClient", "AsyncAgentConnection", "AsyncProcessStream"]

_NAMES = {p.STDOUT: "stdout", p.STDERR: "stderr", p.PTY: "pty"}
#: Bytes a connection's reader buffers before it stops reading the socket (twice this, by asyncio's rule).
STREAM_LIMIT = 1024 * 1024


class bounded:  # noqa: N801 - used like asyncio.timeout
    """``async with bounded(seconds, sandbox_id, what)``: fail with ``AgentUnavailable`` if the block takes
    longer than ``seconds`` (None: no bound).

    ``asyncio.timeout`` with 3.11's cancellation rules (a cancel from elsewhere stays a cancel), as a
    plain class with one timer handle: it is on every agent call's path, three times per exec, where
    ``asyncio.timeout`` under ``asynccontextmanager`` cost a dozen Python calls each."""

    __slots__ = ("seconds", "sandbox_id", "what", "_task", "_handle", "_expired", "_cancelling")

    def __init__(self, seconds: float | None, sandbox_id: str, what: str) -> None:
        self.seconds, self.sandbox_id, self.what = seconds, sandbox_id, what
        self._handle: asyncio.TimerHandle | None = None
        self._expired = False

    async def __aenter__(self) -> None:
        if self.seconds is None:
            return
        task = asyncio.current_task()
        assert task is not None, "bounded() needs a task"
        self._task, self._cancelling = task, task.cancelling()
        self._handle = task.get_loop().call_later(self.seconds, self._expire)  # no second getpid()

    def _expire(self) -> None:
        self._expired = True
        self._task.cancel()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: object) -> None:
        if self._handle is None:
            return
        self._handle.cancel()
        self._handle = None
        if self._expired and self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
            raise AgentUnavailable(f"the sandbox agent did not {self.what} within {self.seconds:g} s "
                                   "(stopped or overloaded?)", sandbox_id=self.sandbox_id) from TimeoutError()


class AsyncAgentConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sandbox_id: str) -> None:
        self.reader, self.writer, self.sandbox_id = reader, writer, sandbox_id

    @classmethod
    async def open(cls, path: str, sandbox_id: str) -> AsyncAgentConnection:
        try:
            async with bounded(AGENT_TIMEOUT, sandbox_id, "accept the connection"):
                reader, writer = await asyncio.open_unix_connection(path, limit=STREAM_LIMIT)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise NotFound(f"sandbox {sandbox_id} is not running (no agent)") from exc
        except OSError as exc:
            raise RuntimeFailure(f"cannot reach the sandbox agent: {exc}", sandbox_id=sandbox_id) from exc
        return cls(reader, writer, sandbox_id)

    async def send(self, obj: dict) -> None:
        self.writer.write(p.message(obj))
        await self.writer.drain()

    async def send_frame(self, kind: int, data: bytes) -> None:
        self.writer.write(p.frame(kind, data))
        await self.writer.drain()

    async def read(self) -> tuple[int, bytes]:
        try:
            head = await self.reader.readexactly(p.HEADER_SIZE)
            kind, length = p.unpack_header(head)
            if length > frame_limit(kind):  # refused before a byte of it is read or allocated
                raise RuntimeFailure(f"oversized frame ({length} bytes, kind {kind}) from the sandbox agent",
                                     sandbox_id=self.sandbox_id)
            return kind, await self.reader.readexactly(length)
        except asyncio.IncompleteReadError as exc:
            raise RuntimeFailure("the sandbox agent closed the connection (sandbox stopped?)",
                                 sandbox_id=self.sandbox_id) from exc
        except (ConnectionError, OSError) as exc:
            raise RuntimeFailure(f"lost the connection to the sandbox agent: {exc}",
                                 sandbox_id=self.sandbox_id) from exc

    async def read_msg(self) -> dict:
        kind, payload = await self.read()
        if kind != p.MSG:
            raise RuntimeFailure(f"unexpected frame kind {kind} from the agent", sandbox_id=self.sandbox_id)
        try:
            return check(p.loads(payload))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise RuntimeFailure("malformed reply from the sandbox agent", sandbox_id=self.sandbox_id) from exc

    async def handshake(self, request: dict) -> dict:
        """Send ``request`` and read its first reply, within ``AGENT_TIMEOUT``."""
        async with bounded(AGENT_TIMEOUT, self.sandbox_id, "answer"):
            await self.send(request)
            return await self.read_msg()

    def close(self) -> None:
        self.writer.close()


class AsyncProcessStream:
    """Events of one process: ``("stdout"|"stderr"|"pty", bytes)`` then ``("end", dict)``."""

    def __init__(self, conn: AsyncAgentConnection, pid: int) -> None:
        self.conn, self.pid = conn, pid
        self.end: dict | None = None

    async def events(self) -> AsyncIterator[tuple[str, bytes | dict]]:
        while self.end is None:
            kind, payload = await self.conn.read()
            if kind == p.MSG:
                try:
                    msg = check(p.loads(payload))
                except (ValueError, UnicodeDecodeError, RecursionError) as exc:
                    raise RuntimeFailure("malformed event from the sandbox agent",
                                         sandbox_id=self.conn.sandbox_id) from exc
                if msg.get("event") == "end":
                    self.end = msg
                    yield "end", msg
            else:
                yield _NAMES.get(kind, "stdout"), payload

    async def send_stdin(self, data: bytes) -> None:
        if self.end is None:  # after the end the agent may be gone: a failed write would poison reads
            await self.conn.send_frame(p.STDIN, data)

    async def control(self, msg: dict) -> None:
        if self.end is None:
            await self.conn.send(msg)

    async def wait(self, out: CappedOutput | None = None, err: CappedOutput | None = None) -> ExecResult:
        """Collect output until the process ends, keeping what ``out``/``err`` allow (default: the
        per-call cap, ``max_output()``, each) and draining the rest; the result says what was cut.
        The kept bytes are the collectors' own buffers (not copied): release them after use."""
        if out is None or err is None:
            cap = max_output()
            out, err = out or CappedOutput(cap), err or CappedOutput(cap)
        try:
            async for kind, data in self.events():
                if kind in ("stdout", "pty"):
                    out.add(data)  # type: ignore[arg-type]
                elif kind == "stderr":
                    err.add(data)  # type: ignore[arg-type]
        finally:
            self.close()
        assert self.end is not None
        try:
            exit_code = int(self.end["exit_code"])
        except (KeyError, TypeError, ValueError) as exc:
            raise RuntimeFailure("malformed end event from the sandbox agent", sandbox_id=self.conn.sandbox_id) from exc
        signal = self.end.get("signal")
        return ExecResult(exit_code=exit_code, stdout_bytes=out.data, stderr_bytes=err.data,  # type: ignore[arg-type]
                          signal=signal if isinstance(signal, int) else None,
                          timed_out=bool(self.end.get("timed_out")), pid=self.pid,
                          stdout_truncated=out.truncated, stderr_truncated=err.truncated)

    def close(self) -> None:
        self.conn.close()


class AsyncAgentClient:
    def __init__(self, socket_path: str, sandbox_id: str = "") -> None:
        self.socket_path, self.sandbox_id = socket_path, sandbox_id

    async def connect(self) -> AsyncAgentConnection:
        return await AsyncAgentConnection.open(self.socket_path, self.sandbox_id)

    async def call(self, request: dict) -> dict:
        """A one-reply operation, answered within ``CALL_TIMEOUT`` (file operations may take a while)."""
        conn = await self.connect()
        try:
            async with bounded(CALL_TIMEOUT, self.sandbox_id, "answer"):
                await conn.send(request)
                return await conn.read_msg()
        finally:
            conn.close()

    async def start(self, request: dict, before: Callable[[], object] | None = None) -> AsyncProcessStream:
        """``request`` is a ``process.start`` body (cmd, env, cwd, user, timeout, stdin, pty, tag).
        ``before`` runs once the agent's connection is open and before the request is sent: work that must
        precede the process (a plain exec's OOM count) then overlaps the agent's own accept."""
        conn = await self.connect()
        try:
            if before is not None:
                before()
            first = await conn.handshake({**request, "op": "process.start"})
            return AsyncProcessStream(conn, _pid(first, self.sandbox_id))
        except BaseException:
            conn.close()
            raise

    async def connect_process(self, pid: int | None = None, tag: str | None = None) -> AsyncProcessStream:
        conn = await self.connect()
        try:
            first = await conn.handshake({"op": "process.connect", "pid": pid, "tag": tag})
            return AsyncProcessStream(conn, _pid(first, self.sandbox_id))
        except BaseException:
            conn.close()
            raise

    async def open_port(self, port: int, host: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A raw byte stream to ``host:port`` inside the sandbox (relayed by the agent)."""
        conn = await self.connect()
        try:
            await conn.handshake({"op": "port.connect", "port": port, "host": host})
        except BaseException:
            conn.close()
            raise
        return conn.reader, conn.writer

    async def read_file(self, path: str, user: str | None = None) -> tuple[dict, AsyncIterator[bytes]]:
        """The file's entry, and its contents as chunks (errors surface before the first chunk)."""
        conn = await self.connect()
        try:
            head = await conn.handshake({"op": "file.read", "path": path, "user": user})
        except BaseException:
            conn.close()
            raise

        async def chunks() -> AsyncIterator[bytes]:
            try:
                while True:
                    kind, payload = await conn.read()
                    if kind == p.DATA:
                        yield payload
                    else:
                        check(p.loads(payload))
                        return
            finally:
                conn.close()
        return head["entry"], chunks()

    async def write_file(self, path: str, chunks: AsyncIterable[bytes] | bytes, *, user: str | None = None,
                         mode: int | None = None, append: bool = False, metadata: dict[str, str] | None = None) -> dict:
        conn = await self.connect()
        try:
            await conn.send({"op": "file.write", "path": path, "user": user, "mode": mode, "append": append,
                             "metadata": metadata})
            try:
                if isinstance(chunks, (bytes, bytearray)):
                    for i in range(0, len(chunks), 4 * p.CHUNK):
                        await conn.send_frame(p.DATA, bytes(chunks[i:i + 4 * p.CHUNK]))
                else:
                    async for chunk in chunks:
                        for i in range(0, len(chunk), 4 * p.CHUNK):
                            await conn.send_frame(p.DATA, bytes(chunk[i:i + 4 * p.CHUNK]))
                await conn.send({"op": "eof"})
            except (BrokenPipeError, ConnectionResetError):
                pass  # refused early: the reply says why
            return (await conn.read_msg())["entry"]
        finally:
            conn.close()

    async def watch(self, path: str, recursive: bool = False, user: str | None = None,
                    include_entry: bool = False) -> AsyncIterator[dict]:
        conn = await self.connect()
        try:
            await conn.handshake({"op": "file.watch", "path": path, "recursive": recursive, "user": user,
                                  "include_entry": include_entry})
        except BaseException:
            conn.close()
            raise

        async def events() -> AsyncIterator[dict]:
            try:
                while True:
                    msg = await conn.read_msg()
                    if msg.get("event") == "end":
                        return
                    yield msg
            finally:
                conn.close()
        return events()


def _pid(first: dict, sandbox_id: str) -> int:
    pid = first.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool):
        raise RuntimeFailure("malformed reply from the sandbox agent (no pid)", sandbox_id=sandbox_id)
    return pid
