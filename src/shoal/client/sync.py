"""The blocking SDK: ``Sandbox`` over httpx (REST) and websockets' sync client (PTY, stdin)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import httpx

from shoal.client import _common as c
from shoal.client._config import CONNECT_TIMEOUT, ClientConfig, ws_url
from shoal.client.models import CommandResult, EntryInfo, FilesystemEvent, Output, ProcessInfo, SandboxInfo
from shoal.errors import Conflict, NotFound, RuntimeFailure, ShoalError

StdinData = str | bytes | bytearray | memoryview | Iterable[bytes] | Any
_UNSET: Any = object()
#: Streams (exec, files, watch) wait as long as the data takes; only connecting is bounded.
STREAM_TIMEOUT = httpx.Timeout(None, connect=CONNECT_TIMEOUT)


class _Http:
    """One httpx client with Shoal's errors: every failure is a ``shoal.errors`` exception."""

    def __init__(self, config: ClientConfig, transport: httpx.BaseTransport | None = None) -> None:
        self.config = config
        self.client = httpx.Client(base_url=config.url, headers=config.headers, transport=transport,
                                   timeout=httpx.Timeout(config.request_timeout, connect=CONNECT_TIMEOUT))

    def send(self, method: str, path: str, *, stream: bool = False, timeout: Any = _UNSET,
             **kwargs: Any) -> httpx.Response:
        if timeout is _UNSET:
            timeout = STREAM_TIMEOUT if stream else self.client.timeout
        try:
            req = self.client.build_request(method, path, timeout=timeout, **kwargs)
            resp = self.client.send(req, stream=stream)
        except httpx.ConnectError as exc:
            raise c.unreachable(self.config.url, exc) from None
        except httpx.TimeoutException as exc:
            raise c.make_error(RuntimeFailure, f"the Shoal daemon at {self.config.url} did not answer in time "
                                               f"({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise c.lost(self.config.url, exc) from None
        if resp.status_code >= 400:
            try:
                body = resp.read()
            except httpx.HTTPError:
                body = b""
            finally:
                resp.close()
            raise c.error_from_body(resp.status_code, body)
        return resp

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        resp = self.send(method, path, **kwargs)
        return resp.json() if resp.content else None

    def lines(self, resp: httpx.Response) -> Iterator[str]:
        """The NDJSON lines of a streamed answer; transport failures become ``RuntimeFailure``."""
        try:
            for line in resp.iter_lines():
                if line:
                    yield line
        except httpx.TransportError as exc:
            raise c.lost(self.config.url, exc) from None
        finally:
            resp.close()

    def ws(self, path: str) -> Any:
        from websockets.exceptions import InvalidHandshake, InvalidStatus
        from websockets.sync.client import connect
        url = ws_url(self.config.url, path)
        try:
            return connect(url, additional_headers=self.config.headers, compression=None, max_size=16 * 2**20,
                           open_timeout=CONNECT_TIMEOUT + 5, close_timeout=2, legacy=True)
        except InvalidStatus as exc:
            raise c.error_from_body(exc.response.status_code, exc.response.body or b"") from None
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            raise c.unreachable(self.config.url, exc) from None

    def close(self) -> None:
        self.client.close()


# --- process event sources ------------------------------------------------------------------------

class _Source:
    """Where one process' events come from: ``pid``, then ``events()`` yields ``Output`` and finally
    the ``end`` dict; ``close()`` stops following (the process keeps running)."""

    pid: int = 0

    def events(self) -> Iterator[Output | dict]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _StreamSource(_Source):
    """NDJSON events of ``POST /exec`` (stream) or ``GET /processes/{pid}/stream``."""

    def __init__(self, http: _Http, method: str, path: str, **kwargs: Any) -> None:
        self.http = http
        self.resp = http.send(method, path, stream=True, **kwargs)
        self._lines = http.lines(self.resp)
        try:
            first = c.decode_event(next(self._lines))
        except StopIteration:
            raise c.ended_early() from None
        except BaseException:
            self.resp.close()
            raise
        if first.get("type") != "start":
            self.resp.close()
            raise c.make_error(RuntimeFailure, f"unexpected first event from the daemon: {first.get('type')!r}")
        self.pid = int(first["pid"])

    def events(self) -> Iterator[Output | dict]:
        for line in self._lines:
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

    def close(self) -> None:
        self.resp.close()


class _WsSource(_Source):
    """A process over the ``/process`` or ``/pty`` WebSocket, optionally fed stdin from a thread."""

    def __init__(self, http: _Http, path: str, start: str, stdin: StdinData = None, pty: bool = False) -> None:
        from websockets.exceptions import ConnectionClosed
        self.pty = pty
        self.ws = http.ws(path)
        try:
            try:
                self.ws.send(start)
            except ConnectionClosed:
                pass  # refused at once: the error message is waiting to be read
            first = self._control(self.ws.recv())
        except ConnectionClosed as exc:
            self.ws.close()
            raise c.make_error(RuntimeFailure, f"the daemon closed the process socket ({exc})") from None
        except BaseException:
            self.ws.close()
            raise
        self.pid = int(first["pid"])
        if stdin is not None and stdin is not True:
            threading.Thread(target=self._feed, args=(stdin,), daemon=True, name=f"shoal-stdin-{self.pid}").start()

    def _control(self, message: str | bytes) -> dict:
        if isinstance(message, bytes):
            raise c.make_error(RuntimeFailure, "unexpected output before the process started")
        msg = json.loads(message)
        if msg.get("type") == "error":
            raise c.error_from_ws(msg)
        return msg

    def _feed(self, data: StdinData) -> None:
        from websockets.exceptions import ConnectionClosed
        try:
            if isinstance(data, (str, bytes, bytearray, memoryview)):
                chunks: Iterable[Any] = c.stdin_chunks(data)
            elif hasattr(data, "read"):
                chunks = c.file_chunks(data)
            else:
                chunks = data
            for chunk in chunks:
                if chunk:
                    for part in c.stdin_chunks(chunk):
                        self.ws.send(part)
            if not self.pty:
                self.ws.send(json.dumps({"type": "close_stdin"}))
        except (ConnectionClosed, OSError, ValueError):
            pass  # the process ended (or we stopped following it) first

    def send(self, data: bytes | str) -> None:
        from websockets.exceptions import ConnectionClosed
        try:
            for part in c.stdin_chunks(data):
                self.ws.send(part)
        except ConnectionClosed:
            raise c.make_error(RuntimeFailure, f"process {self.pid} is gone (its socket is closed)") from None

    def control(self, msg: dict) -> None:
        from websockets.exceptions import ConnectionClosed
        try:
            self.ws.send(json.dumps(msg))
        except ConnectionClosed:
            raise c.make_error(RuntimeFailure, f"process {self.pid} is gone (its socket is closed)") from None

    def events(self) -> Iterator[Output | dict]:
        from websockets.exceptions import ConnectionClosed
        try:
            for message in self.ws:
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

    def close(self) -> None:
        self.ws.close()


def _collect(source: _Source, collector: c.Collector) -> CommandResult:
    collector.pid = source.pid
    try:
        for ev in source.events():
            if isinstance(ev, Output):
                collector.output(ev)
            else:
                collector.finish(ev)
    finally:
        source.close()
    return collector.result()


# --- handles ----------------------------------------------------------------------------------------

class _Pump:
    """Reads a source on a thread, so the process never waits for us; keeps every chunk once."""

    def __init__(self, source: _Source, collector: c.Collector) -> None:
        self.source, self.collector = source, collector
        collector.pid = source.pid
        self.chunks: list[Output] = []
        self.done = False
        self.error: BaseException | None = None
        self.closed = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"shoal-process-{source.pid}")
        self.thread.start()

    def _run(self) -> None:
        try:
            for ev in self.source.events():
                if isinstance(ev, Output):
                    self.collector.output(ev)
                    with self.cond:
                        self.chunks.append(ev)
                        self.cond.notify_all()
                else:
                    self.collector.finish(ev)
        except BaseException as exc:  # noqa: BLE001 - handed to wait()
            if not self.closed:
                self.error = exc
        finally:
            try:
                self.source.close()
            except Exception:  # noqa: BLE001
                pass
            with self.cond:
                self.done = True
                self.cond.notify_all()

    def __iter__(self) -> Iterator[Output]:
        i = 0
        while True:
            with self.cond:
                while i >= len(self.chunks) and not self.done:
                    self.cond.wait()
                if i >= len(self.chunks):
                    break
                item = self.chunks[i]
            i += 1
            yield item
        if self.error is not None:
            raise self.error

    def wait(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise TimeoutError(f"process {self.source.pid} is still running")
        if self.error is not None:
            raise self.error
        if self.collector.end is None:
            raise c.ended_early() if not self.closed else c.make_error(
                RuntimeFailure, "disconnected from the process before it ended")

    def close(self) -> None:
        self.closed = True
        self.source.close()


class CommandHandle:
    """A running command: iterate its output (``Output`` chunks), ``wait()`` for its result,
    ``kill()`` it, feed it stdin, or ``disconnect()`` (the command keeps running)."""

    def __init__(self, commands: Commands, source: _Source, on_stdout: c.TextCallback | None = None,
                 on_stderr: c.TextCallback | None = None) -> None:
        self._commands = commands
        self._source = source
        self.pid = source.pid
        self._pump = _Pump(source, c.Collector(on_stdout, on_stderr))

    def __iter__(self) -> Iterator[Output]:
        return iter(self._pump)

    def wait(self, timeout: float | None = None) -> CommandResult:
        """Block until the command ends; its result holds all output seen by this handle."""
        self._pump.wait(timeout)
        return self._pump.collector.result()

    @property
    def exit_code(self) -> int | None:
        end = self._pump.collector.end
        return None if end is None else int(end["exit_code"])

    def kill(self) -> bool:
        return self._commands.kill(self.pid)

    def send_stdin(self, data: str | bytes) -> None:
        self._commands.send_stdin(self.pid, data)

    def close_stdin(self) -> None:
        self._commands.close_stdin(self.pid)

    def disconnect(self) -> None:
        """Stop following the command; it keeps running (``commands.connect(pid)`` follows it again)."""
        self._pump.close()


class PtyHandle:
    """A process on a terminal: ``send`` input, ``resize``, iterate output (bytes), ``wait()`` for
    its exit code, ``kill()``."""

    def __init__(self, source: _WsSource, on_data: Callable[[bytes], Any] | None = None) -> None:
        self._source = source
        self.pid = source.pid
        self._on_data = on_data
        self._pump = _Pump(source, _PtyCollector(on_data))

    def __iter__(self) -> Iterator[bytes]:
        for out in self._pump:
            yield out.data

    def send(self, data: bytes | str) -> None:
        self._source.send(data)

    def resize(self, cols: int, rows: int) -> None:
        self._source.control({"type": "resize", "cols": int(cols), "rows": int(rows)})

    def kill(self, signal: int = 9) -> None:
        self._source.control({"type": "signal", "signal": int(signal)})

    def wait(self, timeout: float | None = None) -> int:
        self._pump.wait(timeout)
        return self._pump.collector.result().exit_code

    @property
    def result(self) -> CommandResult:
        return self._pump.collector.result()

    def close(self) -> None:
        self._pump.close()

    disconnect = close

    def __enter__(self) -> PtyHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _PtyCollector(c.Collector):
    def __init__(self, on_data: Callable[[bytes], Any] | None) -> None:
        super().__init__()
        self.on_data = on_data

    def output(self, out: Output) -> None:
        self.out.extend(out.data)
        if self.on_data is not None:
            self.on_data(out.data)


class WatchHandle:
    """Filesystem events under a path: iterate ``FilesystemEvent``; ``close()`` stops watching."""

    def __init__(self, http: _Http, resp: httpx.Response) -> None:
        self._resp = resp
        self._lines = http.lines(resp)
        self._closed = False

    def __iter__(self) -> Iterator[FilesystemEvent]:
        try:
            for line in self._lines:
                ev = json.loads(line)
                if ev.get("type") in ("started", None):
                    continue
                yield FilesystemEvent(type=ev["type"], name=ev.get("name", ""), path=ev.get("path", ""))
        except ShoalError:
            if not self._closed:
                raise

    def close(self) -> None:
        self._closed = True
        self._resp.close()

    stop = close

    def __enter__(self) -> WatchHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- sub-APIs -----------------------------------------------------------------------------------------

class Commands:
    """Processes in one sandbox."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._sb = sandbox
        self._http = sandbox._http
        self._base = f"/v1/sandboxes/{sandbox.id}"

    def run(self, cmd: str | list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
            user: str | None = None, timeout: float | None = None, stdin: StdinData = None,
            on_stdout: c.TextCallback | None = None, on_stderr: c.TextCallback | None = None,
            background: bool = False, binary: bool = False, tag: str | None = None) -> Any:
        """Run ``cmd`` (argv list, or a string for ``/bin/sh -c``) and return its ``CommandResult``;
        with ``background=True`` return a ``CommandHandle`` at once.

        ``timeout`` (seconds) kills the command's process tree (``result.timed_out``). ``stdin`` is
        text, bytes, a binary file or an iterable of byte chunks, streamed and then closed (``True``:
        keep stdin open for ``send_stdin``). Callbacks get text as it arrives. Output is byte-exact
        (``stdout_bytes``) when streamed: with callbacks, stdin, ``background`` or ``binary=True``;
        otherwise one plain request returns it as UTF-8 text (invalid bytes become U+FFFD).
        """
        if stdin is not None:
            source: _Source = _WsSource(self._http, f"{self._base}/process",
                                        c.ws_start(cmd, env, cwd, user, timeout), stdin)
        elif background or on_stdout or on_stderr or binary:
            body = c.exec_body(cmd, env, cwd, user, timeout, tag)
            source = _StreamSource(self._http, "POST", f"{self._base}/exec", json={**body, "stream": True})
        else:
            body = c.exec_body(cmd, env, cwd, user, timeout, tag)
            return c.result_from_json(self._http.json("POST", f"{self._base}/exec", json=body,
                                                      timeout=STREAM_TIMEOUT))
        if background:
            return CommandHandle(self, source, on_stdout, on_stderr)
        return _collect(source, c.Collector(on_stdout, on_stderr))

    def connect(self, pid: int, on_stdout: c.TextCallback | None = None,
                on_stderr: c.TextCallback | None = None) -> CommandHandle:
        """Follow a running process' output from now on."""
        source = _StreamSource(self._http, "GET", f"{self._base}/processes/{int(pid)}/stream")
        return CommandHandle(self, source, on_stdout, on_stderr)

    def list(self) -> list[ProcessInfo]:
        return [ProcessInfo.from_json(p) for p in self._http.json("GET", f"{self._base}/processes")]

    def kill(self, pid: int, signal: int = 9) -> bool:
        """Signal the process (and its group); False if there is no such process."""
        try:
            if signal == 9:
                self._http.send("DELETE", f"{self._base}/processes/{int(pid)}")
            else:
                self._http.send("POST", f"{self._base}/processes/{int(pid)}/signal", json={"signal": int(signal)})
            return True
        except NotFound:
            return False

    def send_stdin(self, pid: int, data: str | bytes) -> None:
        import base64
        raw = data.encode() if isinstance(data, str) else bytes(data)
        self._http.send("POST", f"{self._base}/processes/{int(pid)}/stdin",
                        json={"data_b64": base64.b64encode(raw).decode()})

    def close_stdin(self, pid: int) -> None:
        self._http.send("POST", f"{self._base}/processes/{int(pid)}/stdin/close")


class Files:
    """Files in one sandbox (relative paths start from /root)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._http = sandbox._http
        self._base = f"/v1/sandboxes/{sandbox.id}/files"

    @staticmethod
    def _params(path: str, **extra: Any) -> dict:
        return {"path": path, **{k: v for k, v in extra.items() if v is not None}}

    def read(self, path: str, *, user: str | None = None, format: str = "text") -> Any:
        """The file's contents: ``format`` is ``text`` (str), ``bytes``, or ``stream`` (chunks)."""
        if format == "stream":
            return self.read_stream(path, user=user)
        data = self.read_bytes(path, user=user)
        return data if format == "bytes" else data.decode("utf-8", "replace")

    def read_bytes(self, path: str, *, user: str | None = None) -> bytes:
        return b"".join(self.read_stream(path, user=user))

    def read_stream(self, path: str, *, user: str | None = None) -> Iterator[bytes]:
        """The file's bytes as chunks; errors (no such file...) are raised here, before the first one."""
        resp = self._http.send("GET", self._base, stream=True, params=self._params(path, user=user))

        def chunks() -> Iterator[bytes]:
            try:
                yield from resp.iter_bytes()
            except httpx.TransportError as exc:
                raise c.lost(self._http.config.url, exc) from None
            finally:
                resp.close()
        return chunks()

    def write(self, path: str, data: str | bytes | Iterable[bytes] | Any, *, mode: int | None = None,
              user: str | None = None, append: bool = False) -> EntryInfo:
        """Replace (atomically) or ``append`` to a file, from text, bytes, a binary file or an iterable
        of chunks (streamed). Parent directories are created."""
        if isinstance(data, str):
            content: Any = data.encode()
        elif isinstance(data, (bytes, bytearray, memoryview)):
            content = bytes(data)
        elif hasattr(data, "read"):
            content = c.file_chunks(data)
        else:
            content = (chunk.encode() if isinstance(chunk, str) else bytes(chunk) for chunk in data)
        params = self._params(path, user=user, mode=mode, append="true" if append else None)
        return EntryInfo.from_json(self._http.json("PUT", self._base, params=params, content=content,
                                                   headers={"Content-Type": "application/octet-stream"},
                                                   timeout=STREAM_TIMEOUT))

    def list(self, path: str, depth: int = 1) -> list[EntryInfo]:
        return [EntryInfo.from_json(e) for e in
                self._http.json("GET", f"{self._base}/list", params={"path": path, "depth": depth})]

    def stat(self, path: str) -> EntryInfo:
        return EntryInfo.from_json(self._http.json("GET", f"{self._base}/stat", params={"path": path}))

    get_info = stat

    def exists(self, path: str) -> bool:
        try:
            self.stat(path)
            return True
        except NotFound:
            return False

    def make_dir(self, path: str) -> bool:
        """Create a directory and its parents; False if ``path`` exists already."""
        try:
            self._http.send("POST", f"{self._base}/mkdir", json={"path": path})
            return True
        except Conflict:
            return False

    def move(self, src: str, dst: str) -> EntryInfo:
        return EntryInfo.from_json(self._http.json("POST", f"{self._base}/move", json={"src": src, "dst": dst}))

    rename = move

    def remove(self, path: str) -> None:
        self._http.send("DELETE", self._base, params={"path": path})

    def watch(self, path: str, recursive: bool = False) -> WatchHandle:
        """Watch ``path``: the watch is in place when this returns; iterate the handle for events."""
        resp = self._http.send("GET", f"{self._base}/watch", stream=True,
                               params={"path": path, "recursive": "true" if recursive else "false"})
        handle = WatchHandle(self._http, resp)
        try:
            first = json.loads(next(handle._lines))
        except StopIteration:
            resp.close()
            raise c.make_error(RuntimeFailure, "the watch ended at once") from None
        if first.get("type") != "started":
            resp.close()
            raise c.make_error(RuntimeFailure, f"unexpected first watch event {first!r}")
        return handle

    watch_dir = watch


class Pty:
    """Terminals in one sandbox."""

    def __init__(self, sandbox: Sandbox) -> None:
        self._http = sandbox._http
        self._path = f"/v1/sandboxes/{sandbox.id}/pty"

    def create(self, cmd: str | list[str] | None = None, cols: int = 80, rows: int = 24, *,
               env: dict[str, str] | None = None, cwd: str | None = None, user: str | None = None,
               timeout: float | None = None, on_data: Callable[[bytes], Any] | None = None) -> PtyHandle:
        """Start ``cmd`` (default: a login shell) on a new terminal of ``cols`` x ``rows``."""
        source = _WsSource(self._http, self._path, c.ws_start(cmd, env, cwd, user, timeout, cols, rows), pty=True)
        return PtyHandle(source, on_data)


# --- the sandbox ---------------------------------------------------------------------------------------

class _by_id:  # noqa: N801 - used as a decorator
    """On an instance, a method; on the class, the same action by id (E2B's shape):
    ``Sandbox.kill(sandbox_id, url=..., api_key=...)``."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        self.__doc__ = func.__doc__

    def __get__(self, obj: Any, cls: Any) -> Any:
        if obj is not None:
            return self.func.__get__(obj, cls)

        def call(sandbox_id: str, *args: Any, url: str | None = None, api_key: str | None = None,
                 transport: httpx.BaseTransport | None = None, request_timeout: float | None = None,
                 **kwargs: Any) -> Any:
            box = cls(sandbox_id, _http=cls._client(url, api_key, transport, request_timeout))
            try:
                return self.func(box, *args, **kwargs)
            finally:
                box.close()
        call.__doc__ = self.func.__doc__
        return call


class Sandbox:
    """One sandbox, through the Shoal daemon. ``with Sandbox.create() as sb:`` deletes it at the end.

    ``url`` (default ``SHOAL_URL``, else http://127.0.0.1:4040) and ``api_key`` (default
    ``SHOAL_API_KEY``, else the local key of a daemon on this machine) say where and who.
    """

    def __init__(self, sandbox_id: str, *, _http: _Http, _info: SandboxInfo | None = None) -> None:
        self.id = sandbox_id
        self._http = _http
        self._info = _info
        self.commands = Commands(self)
        self.files = Files(self)
        self.pty = Pty(self)

    @staticmethod
    def _client(url: str | None, api_key: str | None, transport: httpx.BaseTransport | None,
                request_timeout: float | None) -> _Http:
        return _Http(ClientConfig.resolve(url, api_key, request_timeout), transport)

    @classmethod
    def create(cls, template: str = "minimal", cpu: float = 1, memory_mb: int = 512, disk_mb: int = 1024,
               timeout: int = 300, env: dict[str, str] | None = None, metadata: dict[str, str] | None = None, *,
               url: str | None = None, api_key: str | None = None, transport: httpx.BaseTransport | None = None,
               request_timeout: float | None = None) -> Sandbox:
        """Create a running sandbox; it is deleted after ``timeout`` seconds (see ``set_timeout``)."""
        http = cls._client(url, api_key, transport, request_timeout)
        body = {"template": template, "cpu": cpu, "memory_mb": memory_mb, "disk_mb": disk_mb, "timeout": timeout,
                "env": dict(env or {}), "metadata": dict(metadata or {})}
        try:
            # an unbuilt template is built first: that can take minutes
            info = SandboxInfo.from_json(http.json("POST", "/v1/sandboxes", json=body, timeout=STREAM_TIMEOUT))
        except BaseException:
            http.close()
            raise
        return cls(info.id, _http=http, _info=info)

    @classmethod
    def connect(cls, sandbox_id: str, *, url: str | None = None, api_key: str | None = None,
                transport: httpx.BaseTransport | None = None, request_timeout: float | None = None) -> Sandbox:
        """An existing sandbox (``NotFound`` if there is none with this id for this key)."""
        http = cls._client(url, api_key, transport, request_timeout)
        try:
            info = SandboxInfo.from_json(http.json("GET", f"/v1/sandboxes/{sandbox_id}"))
        except BaseException:
            http.close()
            raise
        return cls(info.id, _http=http, _info=info)

    @classmethod
    def list(cls, state: str | Iterable[str] | None = None, metadata: dict[str, str] | None = None, *,
             url: str | None = None, api_key: str | None = None, transport: httpx.BaseTransport | None = None,
             request_timeout: float | None = None) -> list[SandboxInfo]:
        """This key's sandboxes, optionally in ``state`` (one or several) and carrying all of ``metadata``."""
        http = cls._client(url, api_key, transport, request_timeout)
        try:
            return [SandboxInfo.from_json(d) for d in http.json("GET", "/v1/sandboxes",
                                                                params=_list_params(state, metadata))]
        finally:
            http.close()

    @property
    def sandbox_id(self) -> str:  # E2B's name for it
        return self.id

    @_by_id
    def info(self) -> SandboxInfo:
        self._info = SandboxInfo.from_json(self._http.json("GET", f"/v1/sandboxes/{self.id}"))
        return self._info

    get_info = info

    def is_running(self) -> bool:
        try:
            return self.info().state == "running"
        except NotFound:
            return False

    @_by_id
    def set_timeout(self, timeout: int) -> SandboxInfo:
        """The sandbox is now deleted ``timeout`` seconds from now."""
        self._info = SandboxInfo.from_json(self._http.json("POST", f"/v1/sandboxes/{self.id}/timeout",
                                                           json={"timeout": int(timeout)}))
        return self._info

    @_by_id
    def pause(self) -> SandboxInfo:
        self._info = SandboxInfo.from_json(self._http.json("POST", f"/v1/sandboxes/{self.id}/pause",
                                                           timeout=STREAM_TIMEOUT))
        return self._info

    @_by_id
    def resume(self) -> SandboxInfo:
        self._info = SandboxInfo.from_json(self._http.json("POST", f"/v1/sandboxes/{self.id}/resume",
                                                           timeout=STREAM_TIMEOUT))
        return self._info

    @_by_id
    def kill(self) -> bool:
        """Delete the sandbox and everything in it; False if it was gone already."""
        try:
            self._http.send("DELETE", f"/v1/sandboxes/{self.id}", timeout=STREAM_TIMEOUT)
            return True
        except NotFound:
            return False

    def close(self) -> None:
        """Close the HTTP client (the sandbox keeps running)."""
        self._http.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.kill()
        finally:
            self.close()

    def __repr__(self) -> str:
        return f"Sandbox(id={self.id!r}, url={self._http.config.url!r})"


def _list_params(state: str | Iterable[str] | None, metadata: dict[str, str] | None) -> list[tuple[str, str]]:
    params: list[tuple[str, str]] = []
    if state:
        for s in [state] if isinstance(state, str) else state:
            params.append(("state", str(s)))
    for k, v in (metadata or {}).items():
        params.append(("metadata", f"{k}={v}"))
    return params
