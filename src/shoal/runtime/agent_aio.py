"""The host side of the agent protocol for asyncio (the daemon): same operations as
``agent_client.AgentClient``, same error translation, no threads on the exec path."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator

from shoal.agent import protocol as p
from shoal.errors import NotFound, RuntimeFailure
from shoal.runtime.agent_client import ExecResult, check

_NAMES = {p.STDOUT: "stdout", p.STDERR: "stderr", p.PTY: "pty"}
STREAM_LIMIT = 4 * 1024 * 1024


class AsyncAgentConnection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sandbox_id: str) -> None:
        self.reader, self.writer, self.sandbox_id = reader, writer, sandbox_id

    @classmethod
    async def open(cls, path: str, sandbox_id: str) -> AsyncAgentConnection:
        try:
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
            if length > p.MAX_FRAME:
                raise RuntimeFailure("oversized frame from the sandbox agent", sandbox_id=self.sandbox_id)
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
        return check(p.loads(payload))

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
                msg = check(p.loads(payload))
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

    async def wait(self) -> ExecResult:
        out, err = bytearray(), bytearray()
        async for kind, data in self.events():
            if kind in ("stdout", "pty"):
                out += data  # type: ignore[operator]
            elif kind == "stderr":
                err += data  # type: ignore[operator]
        assert self.end is not None
        self.close()
        return ExecResult(exit_code=int(self.end["exit_code"]), stdout_bytes=bytes(out), stderr_bytes=bytes(err),
                          signal=self.end.get("signal"), timed_out=bool(self.end.get("timed_out")), pid=self.pid)

    def close(self) -> None:
        self.conn.close()


class AsyncAgentClient:
    def __init__(self, socket_path: str, sandbox_id: str = "") -> None:
        self.socket_path, self.sandbox_id = socket_path, sandbox_id

    async def connect(self) -> AsyncAgentConnection:
        return await AsyncAgentConnection.open(self.socket_path, self.sandbox_id)

    async def call(self, request: dict) -> dict:
        conn = await self.connect()
        try:
            await conn.send(request)
            return await conn.read_msg()
        finally:
            conn.close()

    async def start(self, request: dict) -> AsyncProcessStream:
        """``request`` is a ``process.start`` body (cmd, env, cwd, user, timeout, stdin, pty, tag)."""
        conn = await self.connect()
        try:
            await conn.send({**request, "op": "process.start"})
            first = await conn.read_msg()
            return AsyncProcessStream(conn, int(first["pid"]))
        except BaseException:
            conn.close()
            raise

    async def connect_process(self, pid: int | None = None, tag: str | None = None) -> AsyncProcessStream:
        conn = await self.connect()
        try:
            await conn.send({"op": "process.connect", "pid": pid, "tag": tag})
            first = await conn.read_msg()
            return AsyncProcessStream(conn, int(first["pid"]))
        except BaseException:
            conn.close()
            raise

    async def open_port(self, port: int, host: str = "127.0.0.1") -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A raw byte stream to ``host:port`` inside the sandbox (relayed by the agent)."""
        conn = await self.connect()
        try:
            await conn.send({"op": "port.connect", "port": port, "host": host})
            await conn.read_msg()
        except BaseException:
            conn.close()
            raise
        return conn.reader, conn.writer

    async def read_file(self, path: str, user: str | None = None) -> tuple[dict, AsyncIterator[bytes]]:
        """The file's entry, and its contents as chunks (errors surface before the first chunk)."""
        conn = await self.connect()
        try:
            await conn.send({"op": "file.read", "path": path, "user": user})
            head = await conn.read_msg()
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
                         mode: int | None = None, append: bool = False) -> dict:
        conn = await self.connect()
        try:
            await conn.send({"op": "file.write", "path": path, "user": user, "mode": mode, "append": append})
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
            await conn.send({"op": "file.watch", "path": path, "recursive": recursive, "user": user,
                             "include_entry": include_entry})
            await conn.read_msg()
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
