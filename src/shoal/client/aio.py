"""The asyncio SDK: ``AsyncSandbox``, the same surface as ``Sandbox``, awaited.

This file is the source of both SDKs: ``scripts/gen_sync.py`` writes ``sync.py`` from it by token
rules (``async def`` → ``def``, ``await`` dropped, ``AsyncX`` → ``X``, ``_async_io`` → ``_sync_io``,
``asyncio`` → ``threading``...). Edit this file, then run ``python scripts/gen_sync.py``. What truly
differs between the two (background workers, stdin, uploads, the WebSocket client) lives in
``_async_io.py`` / ``_sync_io.py``; pure shared code lives in ``_common.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import httpx

from shoal.client import _async_io as _io
from shoal.client import _common as c
from shoal.client._common import STREAM_TIMEOUT
from shoal.client._config import CONNECT_TIMEOUT, ClientConfig, ws_url
from shoal.client.models import CommandResult, EntryInfo, FilesystemEvent, Output, ProcessInfo, SandboxInfo
from shoal.errors import Conflict, NotFound, RuntimeFailure, ShoalError

StdinData = _io.StdinData
_UNSET: Any = object()


class _AsyncHttp:
    """One httpx client with Shoal's errors: every failure is a ``shoal.errors`` exception."""

    def __init__(self, config: ClientConfig, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        self.client = httpx.AsyncClient(base_url=config.url, headers=config.headers, transport=transport,
                                        timeout=httpx.Timeout(config.request_timeout, connect=CONNECT_TIMEOUT))

    async def send(self, method: str, path: str, *, stream: bool = False, timeout: Any = _UNSET,
                   **kwargs: Any) -> httpx.Response:
        if timeout is _UNSET:
            timeout = STREAM_TIMEOUT if stream else self.client.timeout
        try:
            req = self.client.build_request(method, path, timeout=timeout, **kwargs)
            resp = await self.client.send(req, stream=stream)
        except httpx.ConnectError as exc:
            raise c.unreachable(self.config.url, exc) from None
        except httpx.TimeoutException as exc:
            raise c.make_error(RuntimeFailure, f"the Shoal daemon at {self.config.url} did not answer in time "
                                               f"({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise c.lost(self.config.url, exc) from None
        if resp.status_code >= 400:
            try:
                body = await resp.aread()
            except httpx.HTTPError:
                body = b""
            finally:
                await resp.aclose()
            raise c.error_from_body(resp.status_code, body)
        return resp

    async def json(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = await self.send(method, path, **kwargs)
        return resp.json() if resp.content else None

    async def lines(self, resp: httpx.Response) -> AsyncIterator[str]:
        """The NDJSON lines of a streamed answer; transport failures become ``RuntimeFailure``."""
        try:
            async for line in resp.aiter_lines():
                if line:
                    yield line
        except httpx.TransportError as exc:
            raise c.lost(self.config.url, exc) from None
        finally:
            await resp.aclose()

    async def ws(self, path: str) -> Any:
        from websockets.exceptions import InvalidHandshake, InvalidStatus
        try:
            return await _io.connect_ws(ws_url(self.config.url, path), self.config.headers)
        except InvalidStatus as exc:
            raise c.error_from_body(exc.response.status_code, exc.response.body or b"") from None
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise c.unreachable(self.config.url, exc) from None

    async def close(self) -> None:
        await self.client.aclose()


# --- process event sources: ``pid``, then ``events()`` yields ``Output`` and finally the ``end`` dict;
# ``close()`` stops following (the process keeps running) ----------------------------------------------

class _AsyncStreamSource:
    """NDJSON events of ``POST /exec`` (stream) or ``GET /processes/{pid}/stream``."""

    pid = 0

    @classmethod
    async def open(cls, http: _AsyncHttp, method: str, path: str, **kwargs: Any) -> _AsyncStreamSource:
        self = cls()
        self.resp = await http.send(method, path, stream=True, **kwargs)
        self._lines = http.lines(self.resp)
        try:
            first = c.decode_event(await self._lines.__anext__())
        except StopAsyncIteration:
            raise c.ended_early() from None
        except BaseException:
            await self.resp.aclose()
            raise
        if first.get("type") != "start":
            await self.resp.aclose()
            raise c.make_error(RuntimeFailure, f"unexpected first event from the daemon: {first.get('type')!r}")
        self.pid = int(first["pid"])
        return self

    async def events(self) -> AsyncIterator[Output | dict]:
        async for line in self._lines:
            ev = c.decode_event(line)
            kind = ev.get("type")
            if kind == "end":
                yield ev
                return
            if kind == "error":
                raise c.error_from_ws(ev)
            if "bytes" in ev:
                yield Output(kind, ev["bytes"])
        raise c.ended_early()

    async def close(self) -> None:
        await self.resp.aclose()


class _AsyncWsSource:
    """A process over the ``/process`` or ``/pty`` WebSocket, optionally fed stdin in the background."""

    pid = 0

    @classmethod
    async def open(cls, http: _AsyncHttp, path: str, start: str, stdin: StdinData = None,
                   pty: bool = False) -> _AsyncWsSource:
        from websockets.exceptions import ConnectionClosed
        self = cls()
        self.pty = pty
        self.ws = await http.ws(path)
        self.feeder: _io.Worker | None = None
        try:
            with contextlib.suppress(ConnectionClosed):  # refused at once: the error message is waiting
                await self.ws.send(start)
            first = self._control(await self.ws.recv())
        except ConnectionClosed as exc:
            await self.ws.close()
            raise c.make_error(RuntimeFailure, f"the daemon closed the process socket ({exc})") from None
        except BaseException:
            await self.ws.close()
            raise
        self.pid = int(first["pid"])
        if stdin is not None and stdin is not True:
            self.feeder = _io.spawn(self._feed, stdin, name=f"shoal-stdin-{self.pid}")
        return self

    def _control(self, message: str | bytes) -> dict:
        if isinstance(message, bytes):
            raise c.make_error(RuntimeFailure, "unexpected output before the process started")
        msg = json.loads(message)
        if msg.get("type") == "error":
            raise c.error_from_ws(msg)
        return msg

    async def _feed(self, data: StdinData) -> None:
        from websockets.exceptions import ConnectionClosed
        try:
            async for chunk in _io.stdin_chunks(data):
                for part in c.stdin_chunks(chunk):
                    await self.ws.send(part)
            if not self.pty:
                await self.ws.send(json.dumps({"type": "close_stdin"}))
        except (ConnectionClosed, OSError, ValueError):
            pass  # the process ended (or we stopped following it) first

    async def send(self, data: bytes | str) -> None:
        from websockets.exceptions import ConnectionClosed
        try:
            for part in c.stdin_chunks(data):
                await self.ws.send(part)
        except ConnectionClosed:
            raise c.make_error(RuntimeFailure, f"process {self.pid} is gone (its socket is closed)") from None

    async def control(self, msg: dict) -> None:
        from websockets.exceptions import ConnectionClosed
        try:
            await self.ws.send(json.dumps(msg))
        except ConnectionClosed:
            raise c.make_error(RuntimeFailure, f"process {self.pid} is gone (its socket is closed)") from None

    async def events(self) -> AsyncIterator[Output | dict]:
        from websockets.exceptions import ConnectionClosed
        try:
            async for message in self.ws:
                if isinstance(message, bytes):
                    out = c.ws_output(message)
                    yield Output("pty", out.data) if self.pty else out
                    continue
                msg = self._control(message)
                if msg.get("type") == "end":
                    yield msg
                    return
        except ConnectionClosed:
            pass
        raise c.ended_early()

    async def close(self) -> None:
        _io.cancel(self.feeder)
        await self.ws.close()


async def _collect(source: Any, collector: c.Collector) -> CommandResult:
    collector.pid = source.pid
    try:
        async for ev in source.events():
            if isinstance(ev, Output):
                collector.output(ev)
            else:
                collector.finish(ev)
    finally:
        await source.close()
    return collector.result()


# --- handles ----------------------------------------------------------------------------------------

class _AsyncPump:
    """Reads a source in the background, so the process never waits for us; keeps every chunk once."""

    def __init__(self, source: Any, collector: c.Collector) -> None:
        self.source, self.collector = source, collector
        collector.pid = source.pid
        self.chunks: list[Output] = []
        self.done = False
        self.error: BaseException | None = None
        self.closed = False
        self.cond = asyncio.Condition()
        self.worker = _io.spawn(self._run, name=f"shoal-process-{source.pid}")

    async def _run(self) -> None:
        try:
            async for ev in self.source.events():
                if isinstance(ev, Output):
                    self.collector.output(ev)
                    async with self.cond:
                        self.chunks.append(ev)
                        self.cond.notify_all()
                else:
                    self.collector.finish(ev)
        except _io.Cancelled:
            pass
        except BaseException as exc:  # noqa: BLE001 - handed to wait()
            if not self.closed:
                self.error = exc
        finally:
            with contextlib.suppress(Exception):
                await self.source.close()
            async with self.cond:
                self.done = True
                self.cond.notify_all()

    async def __aiter__(self) -> AsyncIterator[Output]:
        i = 0
        while True:
            async with self.cond:
                await self.cond.wait_for(lambda i=i: i < len(self.chunks) or self.done)
                if i >= len(self.chunks):
                    break
                item = self.chunks[i]
            i += 1
            yield item
        if self.error is not None:
            raise self.error

    async def wait(self, timeout: float | None = None) -> None:
        if not await _io.join(self.worker, timeout):
            raise TimeoutError(f"process {self.source.pid} is still running")
        if self.error is not None:
            raise self.error
        if self.collector.end is None:
            raise c.ended_early() if not self.closed else c.make_error(
                RuntimeFailure, "disconnected from the process before it ended")

    async def close(self) -> None:
        self.closed = True
        await _io.stop(self.worker, self.source)


class AsyncCommandHandle:
    """A running command: iterate its output (``Output`` chunks), ``wait()`` for its result,
    ``kill()`` it, feed it stdin, or ``disconnect()`` (the command keeps running)."""

    def __init__(self, commands: AsyncCommands, source: Any, on_stdout: c.TextCallback | None = None,
                 on_stderr: c.TextCallback | None = None) -> None:
        self._commands = commands
        self.pid = source.pid
        self._pump = _AsyncPump(source, c.Collector(on_stdout, on_stderr))

    def __aiter__(self) -> AsyncIterator[Output]:
        return self._pump.__aiter__()

    async def wait(self, timeout: float | None = None) -> CommandResult:
        """Wait until the command ends; its result holds all output seen by this handle."""
        await self._pump.wait(timeout)
        return self._pump.collector.result()

    @property
    def exit_code(self) -> int | None:
        end = self._pump.collector.end
        return None if end is None else int(end["exit_code"])

    async def kill(self) -> bool:
        return await self._commands.kill(self.pid)

    async def send_stdin(self, data: str | bytes) -> None:
        await self._commands.send_stdin(self.pid, data)

    async def close_stdin(self) -> None:
        await self._commands.close_stdin(self.pid)

    async def disconnect(self) -> None:
        """Stop following the command; it keeps running (``commands.connect(pid)`` follows it again)."""
        await self._pump.close()


class _PtyCollector(c.Collector):
    def __init__(self, on_data: Callable[[bytes], Any] | None) -> None:
        super().__init__()
        self.on_data = on_data

    def output(self, out: Output) -> None:
        self.out.extend(out.data)
        if self.on_data is not None:
            self.on_data(out.data)


class AsyncPtyHandle:
    """A process on a terminal: ``send`` input, ``resize``, iterate output (bytes), ``wait()`` for
    its exit code, ``kill()``."""

    def __init__(self, source: _AsyncWsSource, on_data: Callable[[bytes], Any] | None = None) -> None:
        self._source = source
        self.pid = source.pid
        self._pump = _AsyncPump(source, _PtyCollector(on_data))

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for out in self._pump:
            yield out.data

    async def send(self, data: bytes | str) -> None:
        await self._source.send(data)

    async def resize(self, cols: int, rows: int) -> None:
        await self._source.control({"type": "resize", "cols": int(cols), "rows": int(rows)})

    async def kill(self, signal: int = 9) -> None:
        await self._source.control({"type": "signal", "signal": int(signal)})

    async def wait(self, timeout: float | None = None) -> int:
        await self._pump.wait(timeout)
        return self._pump.collector.result().exit_code

    @property
    def result(self) -> CommandResult:
        return self._pump.collector.result()

    async def close(self) -> None:
        await self._pump.close()

    disconnect = close

    async def __aenter__(self) -> AsyncPtyHandle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class AsyncWatchHandle:
    """Filesystem events under a path: iterate ``FilesystemEvent``; ``close()`` stops watching."""

    def __init__(self, http: _AsyncHttp, resp: httpx.Response) -> None:
        self._resp = resp
        self._lines = http.lines(resp)
        self._closed = False

    async def __aiter__(self) -> AsyncIterator[FilesystemEvent]:
        try:
            async for line in self._lines:
                ev = json.loads(line)
                if ev.get("type") in ("started", None):
                    continue
                yield FilesystemEvent(type=ev["type"], name=ev.get("name", ""), path=ev.get("path", ""))
        except ShoalError:
            if not self._closed:
                raise

    async def close(self) -> None:
        self._closed = True
        await self._resp.aclose()

    stop = close

    async def __aenter__(self) -> AsyncWatchHandle:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


# --- sub-APIs -----------------------------------------------------------------------------------------

class AsyncCommands:
    """Processes in one sandbox."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._http = sandbox._http
        self._base = f"/v1/sandboxes/{sandbox.id}"

    async def run(self, cmd: str | list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                  user: str | None = None, timeout: float | None = None, stdin: StdinData = None,
                  on_stdout: c.TextCallback | None = None, on_stderr: c.TextCallback | None = None,
                  background: bool = False, binary: bool = False, tag: str | None = None) -> Any:
        """Run ``cmd`` (argv list, or a string for ``/bin/sh -c``) and return its ``CommandResult``;
        with ``background=True`` return its handle (``AsyncCommandHandle``) at once.

        ``timeout`` (seconds) kills the command's process tree (``result.timed_out``). ``stdin`` is
        text, bytes, a binary file or an iterable of byte chunks (``StdinData``), streamed and then
        closed (``True``: keep stdin open for ``send_stdin``). Callbacks get text as it arrives. Output
        is byte-exact (``stdout_bytes``) when streamed: with callbacks, stdin, ``background`` or
        ``binary=True``; otherwise one plain request returns it as UTF-8 text (invalid bytes become U+FFFD).
        """
        if stdin is not None:
            source: Any = await _AsyncWsSource.open(self._http, f"{self._base}/process",
                                                    c.ws_start(cmd, env, cwd, user, timeout), stdin)
        elif background or on_stdout or on_stderr or binary:
            body = c.exec_body(cmd, env, cwd, user, timeout, tag)
            source = await _AsyncStreamSource.open(self._http, "POST", f"{self._base}/exec",
                                                   json={**body, "stream": True})
        else:
            body = c.exec_body(cmd, env, cwd, user, timeout, tag)
            return c.result_from_json(await self._http.json("POST", f"{self._base}/exec", json=body,
                                                            timeout=STREAM_TIMEOUT))
        if background:
            return AsyncCommandHandle(self, source, on_stdout, on_stderr)
        return await _collect(source, c.Collector(on_stdout, on_stderr))

    async def connect(self, pid: int, on_stdout: c.TextCallback | None = None,
                      on_stderr: c.TextCallback | None = None) -> AsyncCommandHandle:
        """Follow a running process' output from now on."""
        source = await _AsyncStreamSource.open(self._http, "GET", f"{self._base}/processes/{int(pid)}/stream")
        return AsyncCommandHandle(self, source, on_stdout, on_stderr)

    async def list(self) -> list[ProcessInfo]:
        return [ProcessInfo.from_json(p) for p in await self._http.json("GET", f"{self._base}/processes")]

    async def kill(self, pid: int, signal: int = 9) -> bool:
        """Signal the process (and its group); False if there is no such process."""
        try:
            if signal == 9:
                await self._http.send("DELETE", f"{self._base}/processes/{int(pid)}")
            else:
                await self._http.send("POST", f"{self._base}/processes/{int(pid)}/signal",
                                      json={"signal": int(signal)})
            return True
        except NotFound:
            return False

    async def send_stdin(self, pid: int, data: str | bytes) -> None:
        import base64
        raw = data.encode() if isinstance(data, str) else bytes(data)
        await self._http.send("POST", f"{self._base}/processes/{int(pid)}/stdin",
                              json={"data_b64": base64.b64encode(raw).decode()})

    async def close_stdin(self, pid: int) -> None:
        await self._http.send("POST", f"{self._base}/processes/{int(pid)}/stdin/close")


class AsyncFiles:
    """Files in one sandbox (relative paths start from /root)."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._http = sandbox._http
        self._base = f"/v1/sandboxes/{sandbox.id}/files"

    @staticmethod
    def _params(path: str, **extra: Any) -> dict:
        return {"path": path, **{k: v for k, v in extra.items() if v is not None}}

    async def read(self, path: str, *, user: str | None = None, format: str = "text") -> Any:
        """The file's contents: ``format`` is ``text`` (str), ``bytes``, or ``stream`` (chunks)."""
        if format == "stream":
            return await self.read_stream(path, user=user)
        data = await self.read_bytes(path, user=user)
        return data if format == "bytes" else data.decode("utf-8", "replace")

    async def read_bytes(self, path: str, *, user: str | None = None) -> bytes:
        return b"".join([chunk async for chunk in await self.read_stream(path, user=user)])

    async def read_stream(self, path: str, *, user: str | None = None) -> AsyncIterator[bytes]:
        """The file's bytes as chunks: ``async for chunk in await sb.files.read_stream(path)``; errors
        (no such file...) are raised by this call, before the first chunk."""
        resp = await self._http.send("GET", self._base, stream=True, params=self._params(path, user=user))

        async def chunks() -> AsyncIterator[bytes]:
            try:
                async for chunk in resp.aiter_bytes():
                    yield chunk
            except httpx.TransportError as exc:
                raise c.lost(self._http.config.url, exc) from None
            finally:
                await resp.aclose()
        return chunks()

    async def write(self, path: str, data: _io.UploadData, *, mode: int | None = None, user: str | None = None,
                    append: bool = False) -> EntryInfo:
        """Replace (atomically) or ``append`` to a file, from text, bytes, a binary file or an iterable
        of chunks (streamed). Parent directories are created."""
        if isinstance(data, str):
            content: Any = data.encode()
        elif isinstance(data, (bytes, bytearray, memoryview)):
            content = bytes(data)
        else:
            content = _io.upload_body(data)
        params = self._params(path, user=user, mode=mode, append="true" if append else None)
        return EntryInfo.from_json(await self._http.json("PUT", self._base, params=params, content=content,
                                                         headers={"Content-Type": "application/octet-stream"},
                                                         timeout=STREAM_TIMEOUT))

    async def list(self, path: str, depth: int = 1) -> list[EntryInfo]:
        return [EntryInfo.from_json(e) for e in
                await self._http.json("GET", f"{self._base}/list", params={"path": path, "depth": depth})]

    async def stat(self, path: str) -> EntryInfo:
        return EntryInfo.from_json(await self._http.json("GET", f"{self._base}/stat", params={"path": path}))

    get_info = stat

    async def exists(self, path: str) -> bool:
        try:
            await self.stat(path)
            return True
        except NotFound:
            return False

    async def make_dir(self, path: str) -> bool:
        """Create a directory and its parents; False if ``path`` exists already."""
        try:
            await self._http.send("POST", f"{self._base}/mkdir", json={"path": path})
            return True
        except Conflict:
            return False

    async def move(self, src: str, dst: str) -> EntryInfo:
        return EntryInfo.from_json(await self._http.json("POST", f"{self._base}/move",
                                                         json={"src": src, "dst": dst}))

    rename = move

    async def remove(self, path: str) -> None:
        await self._http.send("DELETE", self._base, params={"path": path})

    async def watch(self, path: str, recursive: bool = False) -> AsyncWatchHandle:
        """Watch ``path``: the watch is in place when this returns; iterate the handle for events."""
        resp = await self._http.send("GET", f"{self._base}/watch", stream=True,
                                     params={"path": path, "recursive": "true" if recursive else "false"})
        handle = AsyncWatchHandle(self._http, resp)
        try:
            first = json.loads(await handle._lines.__anext__())
        except StopAsyncIteration:
            await resp.aclose()
            raise c.make_error(RuntimeFailure, "the watch ended at once") from None
        if first.get("type") != "started":
            await resp.aclose()
            raise c.make_error(RuntimeFailure, f"unexpected first watch event {first!r}")
        return handle

    watch_dir = watch


class AsyncPty:
    """Terminals in one sandbox."""

    def __init__(self, sandbox: AsyncSandbox) -> None:
        self._http = sandbox._http
        self._path = f"/v1/sandboxes/{sandbox.id}/pty"

    async def create(self, cmd: str | list[str] | None = None, cols: int = 80, rows: int = 24, *,
                     env: dict[str, str] | None = None, cwd: str | None = None, user: str | None = None,
                     timeout: float | None = None, on_data: Callable[[bytes], Any] | None = None) -> AsyncPtyHandle:
        """Start ``cmd`` (default: a login shell) on a new terminal of ``cols`` x ``rows``."""
        source = await _AsyncWsSource.open(self._http, self._path,
                                           c.ws_start(cmd, env, cwd, user, timeout, cols, rows), pty=True)
        return AsyncPtyHandle(source, on_data)


# --- the sandbox ---------------------------------------------------------------------------------------

class _by_id:  # noqa: N801 - used as a decorator
    """On an instance, a method; on the class, the same action by id (E2B's shape):
    ``await AsyncSandbox.kill(sandbox_id, url=..., api_key=...)``."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, obj: Any, cls: Any) -> Any:
        if obj is not None:
            return self.func.__get__(obj, cls)

        async def call(sandbox_id: str, *args: Any, url: str | None = None, api_key: str | None = None,
                       transport: httpx.AsyncBaseTransport | None = None, request_timeout: float | None = None,
                       **kwargs: Any) -> Any:
            box = cls(sandbox_id, _http=cls._client(url, api_key, transport, request_timeout))
            try:
                return await self.func(box, *args, **kwargs)
            finally:
                await box.close()
        call.__doc__ = self.func.__doc__
        return call


class AsyncSandbox:
    """One sandbox, through the Shoal daemon. ``async with await AsyncSandbox.create() as sb:`` deletes
    it at the end.

    ``url`` (default ``SHOAL_URL``, else http://127.0.0.1:4040) and ``api_key`` (default
    ``SHOAL_API_KEY``, else the local key of a daemon on this machine) say where and who.
    """

    def __init__(self, sandbox_id: str, *, _http: _AsyncHttp, _info: SandboxInfo | None = None) -> None:
        self.id = sandbox_id
        self._http = _http
        self._info = _info
        self.commands = AsyncCommands(self)
        self.files = AsyncFiles(self)
        self.pty = AsyncPty(self)

    @staticmethod
    def _client(url: str | None, api_key: str | None, transport: httpx.AsyncBaseTransport | None,
                request_timeout: float | None) -> _AsyncHttp:
        return _AsyncHttp(ClientConfig.resolve(url, api_key, request_timeout), transport)

    @classmethod
    async def create(cls, template: str = "minimal", cpu: float = 1, memory_mb: int = 512, disk_mb: int = 1024,
                     timeout: int = 300, env: dict[str, str] | None = None, metadata: dict[str, str] | None = None,
                     *, url: str | None = None, api_key: str | None = None,
                     transport: httpx.AsyncBaseTransport | None = None,
                     request_timeout: float | None = None, layer: str | None = None,
                     networks: Iterable[str] | None = None, name: str | None = None,
                     snapshot: str | None = None, internet: bool | None = None, egress: dict | None = None,
                     net_limits: dict | None = None, volumes: Iterable[dict] | None = None,
                     standby_after: float | None = None) -> AsyncSandbox:
        """Create a running sandbox; it is deleted after ``timeout`` seconds (see ``set_timeout``).
        ``volumes``: ``[{"name", "path", "read_only"}]`` of this key's volumes (``create_volume``) to mount;
        ``standby_after``: idle seconds before it freezes itself (the next request wakes it; 0: never).
        ``layer``: ``disk`` (the daemon's default: files on the host's disk) or ``ram`` (tmpfs).
        ``networks``: private networks to join (``create_network``), ``name`` its DNS name in them."""
        http = cls._client(url, api_key, transport, request_timeout)
        body = {"template": template, "cpu": cpu, "memory_mb": memory_mb, "disk_mb": disk_mb, "timeout": timeout,
                "env": dict(env or {}), "metadata": dict(metadata or {}), **({"layer": layer} if layer else {})}
        if networks:
            body["networks"] = list(networks)
        if name is not None:
            body["name"] = name
        if volumes:
            body["volumes"] = [dict(v) for v in volumes]
        if standby_after is not None:
            body["standby_after"] = standby_after
        if snapshot is not None:  # its files, on the template it was taken on (``template`` is ignored)
            body["snapshot"] = snapshot
        for key, value in (("internet", internet), ("egress", egress), ("net_limits", net_limits)):
            if value is not None:  # internet=False: nothing past the host; egress/net_limits: docs/networking.md
                body[key] = value
        try:
            # an unbuilt template is built first: that can take minutes
            info = SandboxInfo.from_json(await http.json("POST", "/v1/sandboxes", json=body, timeout=STREAM_TIMEOUT))
        except BaseException:
            await http.close()
            raise
        return cls(info.id, _http=http, _info=info)

    @classmethod
    async def connect(cls, sandbox_id: str, *, url: str | None = None, api_key: str | None = None,
                      transport: httpx.AsyncBaseTransport | None = None,
                      request_timeout: float | None = None) -> AsyncSandbox:
        """An existing sandbox (``NotFound`` if there is none with this id for this key)."""
        http = cls._client(url, api_key, transport, request_timeout)
        try:
            info = SandboxInfo.from_json(await http.json("GET", f"/v1/sandboxes/{sandbox_id}"))
        except BaseException:
            await http.close()
            raise
        return cls(info.id, _http=http, _info=info)

    @classmethod
    async def list(cls, state: str | Iterable[str] | None = None, metadata: dict[str, str] | None = None, *,
                   url: str | None = None, api_key: str | None = None,
                   transport: httpx.AsyncBaseTransport | None = None,
                   request_timeout: float | None = None) -> list[SandboxInfo]:
        """This key's sandboxes, optionally in ``state`` (one or several) and carrying all of ``metadata``."""
        http = cls._client(url, api_key, transport, request_timeout)
        try:
            return [SandboxInfo.from_json(d) for d in await http.json("GET", "/v1/sandboxes",
                                                                      params=c.list_params(state, metadata))]
        finally:
            await http.close()

    @property
    def sandbox_id(self) -> str:  # E2B's name for it
        return self.id

    @_by_id
    async def info(self) -> SandboxInfo:
        self._info = SandboxInfo.from_json(await self._http.json("GET", f"/v1/sandboxes/{self.id}"))
        return self._info

    get_info = info

    async def is_running(self) -> bool:
        try:
            return (await self.info()).state == "running"
        except NotFound:
            return False

    @_by_id
    async def update_network(self, allow_out: Iterable[str] | None = None, deny_out: Iterable[str] | None = None,
                             rules: dict | None = None, internet: bool | None = None) -> dict:
        """Replace its egress policy (all of it, as E2B's ``update_network``); returns the policy as applied."""
        body: dict = {"allow_out": list(allow_out or []), "deny_out": list(deny_out or [])}
        if rules is not None:
            body["rules"] = rules
        if internet is not None:
            body["internet"] = internet
        return await self._http.json("PUT", f"/v1/sandboxes/{self.id}/egress", json=body)

    @_by_id
    async def set_timeout(self, timeout: int) -> SandboxInfo:
        """The sandbox is now deleted ``timeout`` seconds from now."""
        self._info = SandboxInfo.from_json(await self._http.json("POST", f"/v1/sandboxes/{self.id}/timeout",
                                                                 json={"timeout": int(timeout)}))
        return self._info

    @_by_id
    async def pause(self, filesystem_only: bool = False) -> SandboxInfo:
        """Freeze it (memory kept); ``filesystem_only``: stop it and free its memory, keeping its files."""
        body = {"mode": "filesystem"} if filesystem_only else None
        self._info = SandboxInfo.from_json(await self._http.json("POST", f"/v1/sandboxes/{self.id}/pause",
                                                                 json=body, timeout=STREAM_TIMEOUT))
        return self._info

    @_by_id
    async def resume(self) -> SandboxInfo:
        self._info = SandboxInfo.from_json(await self._http.json("POST", f"/v1/sandboxes/{self.id}/resume",
                                                                 timeout=STREAM_TIMEOUT))
        return self._info

    @_by_id
    async def kill(self) -> bool:
        """Delete the sandbox and everything in it; False if it was gone already."""
        try:
            await self._http.send("DELETE", f"/v1/sandboxes/{self.id}", timeout=STREAM_TIMEOUT)
            return True
        except NotFound:
            return False

    # --- snapshots and fork --------------------------------------------------------------------
    @_by_id
    async def create_snapshot(self, name: str | None = None) -> dict:
        """Its files frozen into a snapshot (``create(snapshot=...)`` starts sandboxes from it); memory is
        not kept. Returns ``{"id", "name", "template", "parent", "source_sandbox", "created_at", "size_bytes"}``."""
        return await self._http.json("POST", f"/v1/sandboxes/{self.id}/snapshots",
                                     json={"name": name} if name else None, timeout=STREAM_TIMEOUT)

    @classmethod
    async def list_snapshots(cls, sandbox_id: str | None = None, *, url: str | None = None,
                             api_key: str | None = None,
                             transport: httpx.AsyncBaseTransport | None = None) -> list[dict]:
        """This key's snapshots (only those of ``sandbox_id``, if given)."""
        http = cls._client(url, api_key, transport, None)
        try:
            return await http.json("GET", "/v1/snapshots", params={"sandbox": sandbox_id} if sandbox_id else None)
        finally:
            await http.close()

    @classmethod
    async def delete_snapshot(cls, snapshot: str, *, url: str | None = None, api_key: str | None = None,
                              transport: httpx.AsyncBaseTransport | None = None) -> bool:
        """Delete a snapshot; False if there is none; ``Conflict`` while a sandbox uses it."""
        http = cls._client(url, api_key, transport, None)
        try:
            await http.send("DELETE", f"/v1/snapshots/{snapshot}")
            return True
        except NotFound:
            return False
        finally:
            await http.close()

    async def fork(self, count: int = 1, timeout: int | None = None) -> list[AsyncSandbox]:
        """``count`` new running sandboxes with this one's files (not its memory: their processes start
        fresh); this one keeps running. A fork that failed is left out (``RuntimeFailure`` if all did)."""
        body = {"count": count, **({"timeout": timeout} if timeout is not None else {})}
        res = await self._http.json("POST", f"/v1/sandboxes/{self.id}/fork", json=body, timeout=STREAM_TIMEOUT)
        made = [AsyncSandbox(f["sandbox"]["id"], _http=_AsyncHttp(self._http.config),
                             _info=SandboxInfo.from_json(f["sandbox"])) for f in res["forks"] if f.get("sandbox")]
        if not made:
            errors = [f["error"]["message"] for f in res["forks"] if f.get("error")]
            raise RuntimeFailure(f"no fork could start: {errors[0] if errors else 'unknown reason'}")
        return made

    # --- private networks and ports ------------------------------------------------------------
    @classmethod
    async def create_network(cls, name: str, *, url: str | None = None, api_key: str | None = None,
                             transport: httpx.AsyncBaseTransport | None = None) -> dict:
        """A private network of this key (``create(networks=[name])`` joins it); ``Conflict`` if it exists."""
        http = cls._client(url, api_key, transport, None)
        try:
            return await http.json("POST", "/v1/networks", json={"name": name})
        finally:
            await http.close()

    @classmethod
    async def list_networks(cls, *, url: str | None = None, api_key: str | None = None,
                            transport: httpx.AsyncBaseTransport | None = None) -> list[dict]:
        """This key's private networks, each with its ``members``."""
        http = cls._client(url, api_key, transport, None)
        try:
            return await http.json("GET", "/v1/networks")
        finally:
            await http.close()

    @classmethod
    async def delete_network(cls, name: str, *, url: str | None = None, api_key: str | None = None,
                             transport: httpx.AsyncBaseTransport | None = None) -> None:
        """Remove a private network; ``Conflict`` while it has members."""
        http = cls._client(url, api_key, transport, None)
        try:
            await http.send("DELETE", f"/v1/networks/{name}")
        finally:
            await http.close()

    # --- volumes ---------------------------------------------------------------------------------
    @classmethod
    async def create_volume(cls, name: str, size_mb: int = 1024, *, url: str | None = None,
                            api_key: str | None = None, transport: httpx.AsyncBaseTransport | None = None) -> dict:
        """A named volume of this key (``create(volumes=[{"name", "path"}])`` mounts it); ``Conflict`` if it
        exists. ``size_mb`` is enforced by the kernel (a full volume is ENOSPC)."""
        http = cls._client(url, api_key, transport, None)
        try:
            return await http.json("POST", "/v1/volumes", json={"name": name, "size_mb": size_mb})
        finally:
            await http.close()

    @classmethod
    async def list_volumes(cls, *, url: str | None = None, api_key: str | None = None,
                           transport: httpx.AsyncBaseTransport | None = None) -> list[dict]:
        """This key's volumes, each with the ``sandboxes`` that mount it."""
        http = cls._client(url, api_key, transport, None)
        try:
            return await http.json("GET", "/v1/volumes")
        finally:
            await http.close()

    @classmethod
    async def delete_volume(cls, name: str, *, url: str | None = None, api_key: str | None = None,
                            transport: httpx.AsyncBaseTransport | None = None) -> None:
        """Remove a volume and its files; ``Conflict`` while any sandbox mounts it."""
        http = cls._client(url, api_key, transport, None)
        try:
            await http.send("DELETE", f"/v1/volumes/{name}")
        finally:
            await http.close()

    @_by_id
    async def ports(self) -> list[dict]:
        """TCP ports something listens on inside the sandbox: ``{"port", "address", "family"}``."""
        return await self._http.json("GET", f"/v1/sandboxes/{self.id}/ports")

    @_by_id
    async def expose(self, port: int, host_port: int | None = None, bind: str = "127.0.0.1") -> dict:
        """Serve the sandbox's ``port`` on ``bind:host_port`` of the daemon's host (default: a free port on
        loopback); returns ``{"sandbox_id", "port", "host_port", "bind"}``. ``Conflict`` if the port is taken."""
        body = {"port": port, "bind": bind, **({"host_port": host_port} if host_port is not None else {})}
        return await self._http.json("POST", f"/v1/sandboxes/{self.id}/exposed-ports", json=body)

    @_by_id
    async def exposed_ports(self) -> list[dict]:
        return await self._http.json("GET", f"/v1/sandboxes/{self.id}/exposed-ports")

    @_by_id
    async def unexpose(self, port: int) -> None:
        await self._http.send("DELETE", f"/v1/sandboxes/{self.id}/exposed-ports/{int(port)}")

    async def close(self) -> None:
        """Close the HTTP client (the sandbox keeps running)."""
        await self._http.close()

    async def __aenter__(self) -> AsyncSandbox:
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            await self.kill()
        finally:
            await self.close()

    def __repr__(self) -> str:
        return f"AsyncSandbox(id={self.id!r}, url={self._http.config.url!r})"
