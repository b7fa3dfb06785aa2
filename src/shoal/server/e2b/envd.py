"""envd, E2B's in-sandbox daemon (port 49983), served by the Shoal daemon on the sandbox's agent.

Routes (``scope["shoal.sandbox_id"]`` names the sandbox; ``SandboxRouting`` sets it):

* ``GET /health`` → 204
* ``GET /files?path=&username=`` → the file's bytes (gzip if asked); ``POST /files`` → upload
  (``multipart/form-data`` parts named ``file``, or ``application/octet-stream``, optionally
  ``Content-Encoding: gzip``) → ``[{"name", "type": "file", "path"}]``
* ``POST /process.Process/<Method>`` and ``POST /filesystem.Filesystem/<Method>``: Connect (JSON)

Every request must carry the sandbox's ``X-Access-Token`` (or, on ``/files``, a valid v1 URL
signature, which grants its own path, operation and user only, for a bounded time: ``signing``;
uploads are streamed within the sandbox's free space and a configured maximum: ``uploads``); a sandbox
that is gone or paused answers 502 "... was not found", as E2B's proxy does
(the SDK reads that as "not running"). Operations run as the request's user: HTTP Basic
``Authorization`` (``base64("<user>:")``) on RPCs, ``username`` on ``/files``; default ``user``
(``root`` when the template has no ``user``). Relative paths start at that user's home.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import logging
import posixpath
import time
import urllib.parse
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime

from shoal.engine.text import text_problem
from shoal.errors import CapacityExceeded, InvalidRequest, NotFound, RuntimeFailure, ShoalError
from shoal.runtime.agent_aio import AsyncAgentClient
from shoal.server.asgi import send_json
from shoal.server.e2b import ENVD_PORT, file_metadata, signing, uploads
from shoal.server.e2b import connect as c
from shoal.server.e2b.security import Tokens
from shoal.server.gate import Gate
from shoal.server.sandbox_routing import traffic_agent

log = logging.getLogger("shoal.e2b")
DEFAULT_USER = "user"
#: How a request was let in: the sandbox's access token, or a signed file URL.
TOKEN, SIGNED = "token", "signed"
WATCHER_IDLE = 600.0
WATCHER_MAX_EVENTS = 10000
PASSWD_LIMIT = 1024 * 1024
#: Longest path the facade reports from an agent's entry (Linux's PATH_MAX).
MAX_PATH = 4096
#: Go's names for signals (what envd's ``status`` says: ``signal: killed``).
SIGNAL_NAMES = {1: "hangup", 2: "interrupt", 3: "quit", 4: "illegal instruction", 5: "trace/breakpoint trap",
                6: "aborted", 7: "bus error", 8: "floating point exception", 9: "killed",
                10: "user defined signal 1", 11: "segmentation fault", 12: "user defined signal 2",
                13: "broken pipe", 14: "alarm clock", 15: "terminated"}
SIGNALS = {"SIGNAL_SIGKILL": 9, "SIGNAL_SIGTERM": 15, "SIGNAL_UNSPECIFIED": 0}
ENTRY_TYPES = {"file": "FILE_TYPE_FILE", "dir": "FILE_TYPE_DIRECTORY", "symlink": "FILE_TYPE_SYMLINK"}
EVENT_TYPES = {"create": "EVENT_TYPE_CREATE", "write": "EVENT_TYPE_WRITE", "remove": "EVENT_TYPE_REMOVE",
               "rename": "EVENT_TYPE_RENAME", "chmod": "EVENT_TYPE_CHMOD"}

Send = Callable[[dict], Awaitable[None]]
Receive = Callable[[], Awaitable[dict]]


# --- small helpers -----------------------------------------------------------------------------------

def _rfc3339(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _int(value: object, default: int = 0) -> int:
    """An integer from an agent reply, which the sandbox may forge: anything odd is ``default``."""
    if isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else default
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    return default


def _str(value: object) -> str:
    """A string from an agent reply, safe to answer as JSON (no lone surrogate)."""
    return value.encode("utf-8", "replace").decode() if isinstance(value, str) else ""


def entry_json(e: object) -> dict:
    """The agent's entry as envd's ``EntryInfo`` (proto3 JSON); a forged entry gives empty fields, not a 500."""
    e = e if isinstance(e, dict) else {}
    kind = e.get("type")
    modified = e.get("modified")
    ts = float(modified) if isinstance(modified, int | float) and not isinstance(modified, bool) \
        and 0 <= modified < 253402300800 else 0.0
    out = {"name": _str(e.get("name")), "type": ENTRY_TYPES.get(kind, "FILE_TYPE_UNSPECIFIED")
           if isinstance(kind, str) else "FILE_TYPE_UNSPECIFIED", "path": _str(e.get("path")),
           "size": str(max(0, _int(e.get("size")))), "mode": _int(e.get("mode")) & 0xFFFFFFFF,
           "permissions": _str(e.get("permissions")), "owner": _str(str(e.get("owner") or "")),
           "group": _str(str(e.get("group") or "")), "modifiedTime": _rfc3339(ts)}
    if kind == "symlink":
        # E2B describes a link by what it points to: the target's type and its absolute path, which the
        # agent resolved inside the sandbox. A dangling link (or a forged target) stays a symlink.
        target = e.get("target") if isinstance(e.get("target"), dict) else {}
        tpath, ttype = target.get("path"), target.get("type")
        if isinstance(tpath, str) and tpath.startswith("/") and len(tpath) <= MAX_PATH and ttype in ENTRY_TYPES:
            out["type"] = ENTRY_TYPES[ttype]
            out["symlinkTarget"] = _str(tpath)
        else:
            out["symlinkTarget"] = _str(e.get("symlink_target"))[:MAX_PATH]
        out["isSymlink"] = True
    meta = file_metadata.reported(e.get("metadata"))
    if meta:
        out["metadata"] = meta
    return out


def end_event(end: dict) -> dict:
    """The agent's end of a process as envd's ``EndEvent``: a signal death is exit code -1."""
    sig = _int(end.get("signal"))
    if sig:
        return {"exitCode": -1, "exited": False, "status": f"signal: {SIGNAL_NAMES.get(sig, f'signal {sig}')}"}
    code = _int(end.get("exit_code"))
    return {"exitCode": code, "exited": True, "status": f"exit status {code}"}


def _text(value: object, what: str, empty: bool = True) -> str:
    """A string the sandbox can take (``engine.text``: no NUL byte, no lone surrogate), as Connect's error."""
    if not isinstance(value, str) or (not empty and not value):
        raise c.ConnectError("invalid_argument", f"{what} must be a{'' if empty else ' non-empty'} string")
    problem = text_problem(value)
    if problem is not None:
        raise c.ConnectError("invalid_argument", f"{what} {problem}")
    return value


def _obj(value: object, what: str) -> dict:
    """A sub-message: absent (null) is empty, anything but an object is the caller's error. Every
    nested field is read through this, so ``"process": 5`` is invalid_argument, not AttributeError."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise c.ConnectError("invalid_argument", f"{what} must be an object")
    return value


def _uint(value: object, what: str, default: int, high: int = 2**32 - 1) -> int:
    """A proto3 integer field (a JSON number or a decimal string, as protojson allows), in
    ``0..high``; absent or 0 is ``default``. Bools, fractions, NaN and out-of-range values are refused."""
    if value is None:
        return default
    if isinstance(value, str) and value.strip().isdigit() and len(value) <= 20:
        value = int(value)
    elif isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
        raise c.ConnectError("invalid_argument", f"{what} must be an integer between 0 and {high}")
    return value or default


def _flag(value: object, what: str, default: bool = False) -> bool:
    if value is None:
        return default
    if not isinstance(value, bool):
        raise c.ConnectError("invalid_argument", f"{what} must be true or false")
    return value


def _selector(msg: object) -> dict:
    sel = _obj(msg, "process")
    if sel.get("pid") is not None:
        pid = _uint(sel["pid"], "process.pid", 0, 2**31 - 1)
        if pid:
            return {"pid": pid, "tag": None}
    if sel.get("tag"):
        return {"pid": None, "tag": _text(sel["tag"], "process.tag")}
    raise c.ConnectError("invalid_argument", "a process selector (pid or tag) is required")


def _pty_size(pty: object) -> dict:
    size = _obj(_obj(pty, "pty").get("size"), "pty.size")
    return {"cols": _uint(size.get("cols"), "pty.size.cols", 80, 65535),
            "rows": _uint(size.get("rows"), "pty.size.rows", 24, 65535)}


def _input_bytes(msg: object) -> bytes:
    """``ProcessInput``: ``{"stdin": base64}`` or ``{"pty": base64}``."""
    data = _obj(msg, "input")
    raw = data.get("stdin") if "stdin" in data else data.get("pty")
    return _b64(raw) if raw is not None else b""


def _b64(data: object) -> bytes:
    if not isinstance(data, str):
        raise c.ConnectError("invalid_argument", "bytes must be base64 strings")
    try:
        return base64.b64decode(data + "=" * (-len(data) % 4), altchars=b"-_" if ("-" in data or "_" in data)
                                else None)
    except (binascii.Error, ValueError) as exc:
        raise c.ConnectError("invalid_argument", "invalid base64") from exc


def _query(scope: dict) -> dict[str, str]:
    """The query parameters; values the sandbox could not take (NUL, bad UTF-8) are dropped."""
    pairs = urllib.parse.parse_qsl(scope.get("query_string", b"").decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v for k, v in pairs if "\0" not in v and "\ufffd" not in v}


def _basic_user(headers: dict[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if not auth.lower().startswith("basic "):
        return None
    try:
        decoded = base64.b64decode(auth[6:].strip()).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None
    name = decoded.split(":", 1)[0]
    return name if name and "\0" not in name else None


def _written(entry: object) -> dict:
    """The agent's entry for a written file as envd's answer: only the fields the answer has, as strings."""
    e = entry if isinstance(entry, dict) else {}
    kind = e.get("type")
    out = {"name": _str(e.get("name")), "type": kind if kind in ("file", "dir", "symlink") else "file",
           "path": _str(e.get("path"))}
    meta = file_metadata.reported(e.get("metadata"))
    if meta:
        out["metadata"] = meta
    return out


def _http_status(exc: ShoalError) -> int:
    if isinstance(exc, CapacityExceeded):
        return 507
    return exc.status


# --- relaying a stream of events with keepalives, deadline and disconnect ------------------------------

class Relay:
    """Copy events from ``source`` to a Connect server stream through ``handle`` until the source
    ends, the client leaves, or the deadline passes; send ``keepalive`` every ``interval`` seconds.

    A process must not stall for good because nobody reads its stream (the SDK's ``background=True``
    handles are often never read): up to ``MAX_BUFFERED`` bytes of output wait for the client; past
    that the source waits too (backpressure, so a slow but reading client loses nothing), but once
    the client has taken nothing for ``STALL`` seconds, output is dropped for this client (logged)
    until it catches up. The end of the stream is never dropped."""

    MAX_BUFFERED = 16 * 1024 * 1024
    STALL = 5.0

    def __init__(self, receive: Receive, out: c.ServerStream, deadline: c.Deadline,
                 keepalive: dict | None, interval: float | None) -> None:
        self.receive, self.out, self.deadline = receive, out, deadline
        self.keepalive, self.interval = keepalive, interval
        self.dropped = 0

    async def run(self, source: AsyncIterator, handle: Callable[[object], Awaitable[bool]],
                  weigh: Callable[[object], int] | None = None) -> str:
        """Returns ``"end"`` (``handle`` returned True or the source ended), ``"disconnect"`` or
        ``"deadline"``; a source error propagates. ``weigh(item)``: bytes an item holds (0: never
        dropped)."""
        buf: collections.deque = collections.deque()
        ready = asyncio.Event()
        drained = asyncio.Event()
        held = 0
        stalled = False

        def put(entry: tuple, weight: int = 0) -> None:
            nonlocal held
            buf.append((entry, weight))
            held += weight
            ready.set()

        async def room(weight: int) -> None:
            while held and held + weight > self.MAX_BUFFERED:
                drained.clear()
                await drained.wait()

        async def read() -> None:
            nonlocal stalled
            try:
                async for item in source:
                    weight = weigh(item) if weigh is not None else 0
                    if weight and held + weight > self.MAX_BUFFERED:
                        if not stalled:
                            try:
                                await asyncio.wait_for(room(weight), self.STALL)
                            except TimeoutError:
                                stalled = True
                                log.warning("a client stopped reading its stream: output dropped for it")
                        if stalled:
                            self.dropped += weight
                            continue
                    put(("item", item), weight)
                put(("eof", None))
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                put(("error", exc))

        async def next_entry() -> tuple:
            nonlocal held, stalled
            while not buf:
                ready.clear()
                await ready.wait()
            entry, weight = buf.popleft()
            held -= weight
            if held <= self.MAX_BUFFERED // 2:
                stalled = False
                drained.set()
            return entry

        reader = asyncio.create_task(read())
        gone = asyncio.create_task(c.wait_disconnect(self.receive))
        get: asyncio.Task | None = None
        next_ping = time.monotonic() + self.interval if self.interval else None
        try:
            while True:
                if get is None:
                    get = asyncio.create_task(next_entry())
                limits = [t for t in (self.deadline.remaining(),
                                      None if next_ping is None else max(0.0, next_ping - time.monotonic()))
                          if t is not None]
                done, _ = await asyncio.wait({get, gone}, timeout=min(limits) if limits else None,
                                             return_when=asyncio.FIRST_COMPLETED)
                if gone in done:
                    return "disconnect"
                if get in done:
                    kind, value = get.result()
                    get = None
                    if kind == "eof":
                        return "end"
                    if kind == "error":
                        raise value
                    if await handle(value):
                        return "end"
                    continue
                left = self.deadline.remaining()
                if left is not None and left <= 0:
                    return "deadline"
                if next_ping is not None and time.monotonic() >= next_ping:
                    await self.out.send_message(self.keepalive or {})
                    next_ping = time.monotonic() + (self.interval or 0)
        finally:
            for task in (reader, gone, get):
                if task is not None:
                    task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.gather(*(t for t in (reader, gone, get) if t is not None), return_exceptions=True)
            closer = getattr(source, "aclose", None)
            if closer is not None:
                with contextlib.suppress(BaseException):
                    await closer()


# --- polled watchers (CreateWatcher / GetWatcherEvents / RemoveWatcher) ------------------------------

class Watcher:
    def __init__(self, sandbox_id: str, task: asyncio.Task | None = None) -> None:
        self.sandbox_id = sandbox_id
        self.events: list[dict] = []
        self.task = task
        self.used = time.monotonic()
        self.error: str | None = None


# --- the app -------------------------------------------------------------------------------------------

class EnvdApp:
    def __init__(self, gate: Gate, tokens: Tokens) -> None:
        self.gate, self.tokens = gate, tokens
        engine = self.engine = gate.engine
        self._passwd: dict[str, dict[str, str]] = {}
        self.watchers: dict[str, Watcher] = {}
        engine.subscribe(self._on_event)

    def _on_event(self, event: dict) -> None:
        if event.get("type") in ("deleted", "expired"):
            sid = event["sandbox"]["id"]
            self._passwd.pop(sid, None)
            for wid, w in list(self.watchers.items()):
                if w.sandbox_id == sid:
                    self.watchers.pop(wid, None)
                    if w.task is not None:
                        w.task.get_loop().call_soon_threadsafe(w.task.cancel)

    # --- entry -----------------------------------------------------------------------------------------
    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 4404})
            return
        if scope["type"] != "http":
            return
        sid = scope["shoal.sandbox_id"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path, method = scope["path"], scope["method"]
        rpc = path.startswith(("/process.Process/", "/filesystem.Filesystem/"))
        query = _query(scope)
        auth = self._authorized(sid, headers, path, method, query)
        if auth is None:
            if rpc:
                await c.send_unary_error(send, c.ConnectError("unauthenticated", "invalid or missing X-Access-Token"))
            else:
                await send_json(send, 401, {"code": 401, "message": "invalid or missing X-Access-Token"})
            return
        agent, problem = traffic_agent(self.gate, sid)
        if problem is None and auth == SIGNED:
            problem = self._signature_expired(sid, query)
            if problem is not None:
                await send_json(send, 401, {"code": 401, "message": problem})
                return
        if problem is not None:
            await send_json(send, 502, {"code": 502, "message": problem})
            return
        if auth == SIGNED:  # the URL grants its own user only, whatever Authorization says
            headers.pop("authorization", None)
        if rpc:
            await self._rpc(scope, receive, send, sid, agent, headers, path)
        elif path == "/health":
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})
        elif path == "/files" and method == "GET":
            await self._download(send, sid, agent, headers, query)
        elif path == "/files" and method == "POST":
            await self._upload(receive, send, sid, agent, headers, query, signed=auth == SIGNED)
        else:
            await send_json(send, 501, {"code": 501, "message": f"not supported by this server: envd {method} {path}"})

    def _authorized(self, sid: str, headers: dict[str, str], path: str, method: str, query: dict) -> str | None:
        """``TOKEN`` (the sandbox's access token: any user, any path), ``SIGNED`` (a file URL's
        signature: its own path, operation and user only; see ``signing``) or None."""
        if self.tokens.check_envd(sid, headers.get("x-access-token")):
            return TOKEN
        if path == "/files" and query.get("signature") and signing.matches(
                self.tokens.envd(sid), query.get("path", ""), "read" if method == "GET" else "write",
                query.get("username"), query.get("signature"), query.get("signature_expiration")):
            return SIGNED
        return None

    def _signature_expired(self, sid: str, query: dict) -> str | None:
        """Why a matching signature is no longer valid (``signing.expired``), for a running sandbox."""
        try:
            created = self.engine.get(sid).created_at
        except ShoalError:
            return f"The sandbox {sid} was not found"
        return signing.expired(query.get("signature_expiration"), created)

    # --- users -----------------------------------------------------------------------------------------
    async def _homes(self, sid: str, agent: AsyncAgentClient, refresh: bool = False) -> dict[str, str]:
        homes = self._passwd.get(sid)
        if homes is None or refresh:
            homes = {}
            try:
                _entry, chunks = await agent.read_file("/etc/passwd", "root")
                data = b""
                async for chunk in chunks:  # the sandbox owns this file: read a sane amount only
                    data += chunk
                    if len(data) > PASSWD_LIMIT:
                        await chunks.aclose()  # type: ignore[attr-defined]
                        break
                for line in data.decode("utf-8", "replace").splitlines():
                    parts = line.split(":")
                    if len(parts) >= 6 and parts[0]:
                        homes.setdefault(parts[0], parts[5] or "/")
            except ShoalError:
                pass
            if homes:  # a failed read is tried again next time
                self._passwd[sid] = homes
        return homes

    async def _user(self, sid: str, agent: AsyncAgentClient, asked: str | None) -> str:
        if asked:
            return asked
        homes = await self._homes(sid, agent)
        return DEFAULT_USER if DEFAULT_USER in homes else "root"

    async def _home(self, sid: str, agent: AsyncAgentClient, user: str) -> str:
        homes = await self._homes(sid, agent)
        if user not in homes:
            homes = await self._homes(sid, agent, refresh=True)
        return homes.get(user, "/root" if user == "root" else "/")

    # --- Connect dispatch ------------------------------------------------------------------------------
    async def _rpc(self, scope: dict, receive: Receive, send: Send, sid: str, agent: AsyncAgentClient,
                   headers: dict[str, str], path: str) -> None:
        service, _, method = path[1:].partition("/")
        name = f"{service}/{method}"
        deadline = c.Deadline(c.timeout_seconds(headers))
        try:
            user = await self._user(sid, agent, _basic_user(headers))
        except ShoalError as exc:
            await c.send_unary_error(send, c.from_shoal(exc))
            return
        streaming = headers.get("content-type", "").split(";")[0].strip().startswith("application/connect+")
        if name in _STREAMS:
            out = c.ServerStream(send, scope)
            try:
                if not streaming:
                    raise c.ConnectError("invalid_argument", f"{name} is a streaming method")
                if name == "process.Process/StreamInput":
                    await self._stream_input(receive, out, agent, deadline)
                else:
                    req = c.decode_single_envelope(await c.read_body(receive))
                    handler = getattr(self, _STREAMS[name])
                    await handler(req, receive, out, sid, agent, user, headers, deadline)
            except c.ConnectError as exc:
                await out.end(exc)
            except ShoalError as exc:
                if self._sandbox_lost(sid, exc):
                    await out.abort()  # not ended: see ServerStream.abort
                    return
                await out.end(c.from_shoal(exc))
            except Exception as exc:  # noqa: BLE001 - every failure must end the stream properly
                log.exception("envd stream failed")
                await out.end(c.ConnectError("internal", f"internal error: {type(exc).__name__}"))
            else:
                await out.end()
            return
        try:
            if name not in _UNARY:
                raise c.ConnectError("unimplemented", f"not supported by this server: {name}")
            if streaming:
                raise c.ConnectError("invalid_argument", f"{name} is a unary method")
            req = c.decode_unary(await c.read_body(receive))
            handler = getattr(self, _UNARY[name])
            reply = await deadline.run(handler(req, sid, agent, user))
        except c.ConnectError as exc:
            await c.send_unary_error(send, exc)
            return
        except ShoalError as exc:
            await c.send_unary_error(send, c.from_shoal(exc))
            return
        except Exception as exc:  # noqa: BLE001
            log.exception("envd call failed")
            await c.send_unary_error(send, c.ConnectError("internal", f"internal error: {type(exc).__name__}"))
            return
        await c.send_unary(send, reply)  # type: ignore[arg-type]

    def _sandbox_lost(self, sid: str, exc: ShoalError) -> bool:
        """Whether a stream failed because the sandbox went away under it (killed, expired, paused) or
        its agent's connection dropped, rather than with an answer to give."""
        if isinstance(exc, RuntimeFailure) and isinstance(exc.__cause__, asyncio.IncompleteReadError | OSError):
            return True
        _agent, problem = traffic_agent(self.gate, sid)
        return problem is not None

    @staticmethod
    def _keepalive(headers: dict[str, str]) -> float | None:
        try:
            value = float(headers.get("keepalive-ping-interval") or 0)
        except ValueError:
            return None
        return value if value > 0 else None

    # --- process.Process -------------------------------------------------------------------------------
    async def _start(self, req: dict, receive: Receive, out: c.ServerStream, sid: str, agent: AsyncAgentClient,
                     user: str, headers: dict[str, str], deadline: c.Deadline) -> None:
        proc = _obj(req.get("process"), "process")
        cmd = _text(proc.get("cmd"), "process.cmd", empty=False)
        args = proc.get("args") or []
        envs = proc.get("envs") or {}
        if not isinstance(args, list):
            raise c.ConnectError("invalid_argument", "process.args must be a list of strings")
        if not isinstance(envs, dict):
            raise c.ConnectError("invalid_argument", "process.envs must be an object")
        env = {}
        for k, v in envs.items():
            name = _text(k, "an environment variable name", empty=False)
            if "=" in name:
                raise c.ConnectError("invalid_argument", "an environment variable name must not contain '='")
            env[name] = _text(v, "an environment variable's value")
        start: dict = {"cmd": [cmd, *(_text(a, "process.args") for a in args)], "env": env, "user": user}
        cwd = proc.get("cwd")
        if cwd:
            cwd = _text(cwd, "process.cwd")
            start["cwd"] = cwd if cwd.startswith("/") else posixpath.join(await self._home(sid, agent, user), cwd)
        if req.get("tag"):
            start["tag"] = _text(req["tag"], "tag")
        pty = req.get("pty")
        if pty is not None:
            start["pty"] = {"size": _pty_size(pty)}
        else:
            start["stdin"] = _flag(req.get("stdin"), "stdin", True)
        left = deadline.remaining()
        if left is not None:
            start["timeout"] = max(0.001, left)
        stream = await agent.start(start)
        try:
            await out.send_message({"event": {"start": {"pid": stream.pid}}})
            await self._follow(stream, receive, out, headers, deadline, kill_on_deadline=True)
        finally:
            stream.close()

    async def _connect(self, req: dict, receive: Receive, out: c.ServerStream, sid: str, agent: AsyncAgentClient,
                       user: str, headers: dict[str, str], deadline: c.Deadline) -> None:
        sel = _selector(req.get("process"))
        stream = await agent.connect_process(pid=sel["pid"], tag=sel["tag"])
        try:
            await out.send_message({"event": {"start": {"pid": stream.pid}}})
            await self._follow(stream, receive, out, headers, deadline, kill_on_deadline=False)
        finally:
            stream.close()

    async def _follow(self, stream, receive: Receive, out: c.ServerStream, headers: dict[str, str],  # noqa: ANN001
                      deadline: c.Deadline, kill_on_deadline: bool) -> None:
        ended: dict = {}

        async def handle(item: object) -> bool:
            kind, data = item  # type: ignore[misc]
            if kind == "end":
                ended.update(data)
                return True
            await out.send_message({"event": {"data": {kind: base64.b64encode(data).decode()}}})
            return False

        relay = Relay(receive, out, deadline, {"event": {"keepalive": {}}}, self._keepalive(headers))
        why = await relay.run(stream.events(), handle,
                              weigh=lambda item: 0 if item[0] == "end" else len(item[1]))  # type: ignore[index]
        if why == "deadline":
            if kill_on_deadline:
                with contextlib.suppress(ShoalError, OSError):
                    await stream.control({"op": "signal", "signal": 9})
            raise c.ConnectError("deadline_exceeded", "the process ran past its timeout and was killed"
                                 if kill_on_deadline else "the call's deadline passed")
        if why == "disconnect":
            return
        if ended.get("timed_out"):
            raise c.ConnectError("deadline_exceeded", "the process ran past its timeout and was killed")
        if ended:
            await out.send_message({"event": {"end": end_event(ended)}})

    async def _list(self, req: dict, sid: str, agent: AsyncAgentClient, user: str) -> dict:
        reply = await agent.call({"op": "process.list"})
        procs = []
        listed = reply.get("processes")
        for p in listed if isinstance(listed, list) else []:  # the agent's reply: checked like any input
            if not isinstance(p, dict):
                continue
            args, envs = p.get("args"), p.get("envs")
            config: dict = {"cmd": _str(p.get("cmd")), "args": [_str(a) for a in args] if isinstance(args, list)
                            else [], "envs": {_str(k): _str(v) for k, v in envs.items()} if isinstance(envs, dict)
                            else {}}
            if p.get("cwd"):
                config["cwd"] = _str(p["cwd"])
            item: dict = {"config": config, "pid": _int(p.get("pid"))}
            if p.get("tag"):
                item["tag"] = _str(p["tag"])
            procs.append(item)
        return {"processes": procs}

    async def _send_input(self, req: dict, sid: str, agent: AsyncAgentClient, user: str) -> dict:
        sel = _selector(req.get("process"))
        payload = _input_bytes(req.get("input"))
        await agent.call({"op": "process.stdin", **sel, "data_b64": base64.b64encode(payload).decode()})
        return {}

    async def _send_signal(self, req: dict, sid: str, agent: AsyncAgentClient, user: str) -> dict:
        sel = _selector(req.get("process"))
        sig = req.get("signal", 0)
        signum = SIGNALS.get(sig) if isinstance(sig, str) else sig
        if isinstance(signum, bool) or not isinstance(signum, int) or signum not in (9, 15):
            raise c.ConnectError("invalid_argument", f"unsupported signal {sig!r} (SIGNAL_SIGKILL or SIGNAL_SIGTERM)")
        await agent.call({"op": "process.signal", **sel, "signal": signum})
        return {}

    async def _close_stdin(self, req: dict, sid: str, agent: AsyncAgentClient, user: str) -> dict:
        sel = _selector(req.get("process"))
        await agent.call({"op": "process.close_stdin", **sel})
        return {}

    async def _update(self, req: dict, sid: str, agent: AsyncAgentClient, user: str) -> dict:
        sel = _selector(req.get("process"))
        if not _obj(req.get("pty"), "pty").get("size"):
            return {}
        await agent.call({"op": "process.resize", **sel, **_pty_size(req.get("pty"))})
        return {}

    async def _stream_input(self, receive: Receive, out: c.ServerStream, agent: AsyncAgentClient,
                            deadline: c.Deadline) -> None:
        sel: dict | None = None

        async def consume() -> None:
            nonlocal sel
            async for msg in c.client_messages(receive):
                if "start" in msg:
                    sel = _selector(_obj(msg.get("start"), "start").get("process"))
                    await agent.call({"op": "process.stdin", **sel, "data_b64": ""})  # not_found early
                elif "data" in msg:
                    if sel is None:
                        raise c.ConnectError("invalid_argument", "the first message must be start")
                    payload = _input_bytes(_obj(msg.get("data"), "data").get("input"))
                    if payload:
                        await agent.call({"op": "process.stdin", **sel,
                                          "data_b64": base64.b64encode(payload).decode()})
        await deadline.run(consume())
        await out.send_message({})

    # --- filesystem.Filesystem -------------------------------------------------------------------------
    @staticmethod
    def _path(req: dict, key: str = "path") -> str:
        return _text(req.get(key), key, empty=False)

    async def _stat(self, req: dict, sid: str, agent: AsyncAgentClient, user: str) -> dict:
        reply = await agent.call({"op": "file.stat", "path": self._path(req), "user": user})
        return {"entry": entry_json(reply.get("entry"))}

    async def _make_dir(self, req: dict, sid: str, agent: AsyncAgentClient, user: str) -> dict:
        reply = await agent.call({"op": "file.mkdir", "path": self._path(req), "user": user, "parents": True})
        return {"entry": entry_json(reply.get("entry"))}

    async def _move(self, req: dict, sid: str, agent: AsyncAgentClient, user: str) -> dict:
        src, dst = self._path(req, "source"), self._path(req, "destination")
        reply = await agent.call({"op": "file.move", "src": src, "dst": dst, "user": user})
        return {"entry": entry_json(reply.get("entry"))}

    async def _list_dir(self, req: dict, sid: str, agent: AsyncAgentClient, user: str) -> dict:
        depth = _uint(req.get("depth"), "depth", 1, 64)
        reply = await agent.call({"op": "file.list", "path": self._path(req), "depth": depth, "user": user})
        entries = reply.get("entries")
        return {"entries": [entry_json(e) for e in (entries if isinstance(entries, list) else [])]}

    async def _remove(self, req: dict, sid: str, agent: AsyncAgentClient, user: str) -> dict:
        try:
            await agent.call({"op": "file.remove", "path": self._path(req), "user": user})
        except NotFound:
            pass  # envd removes with RemoveAll: a missing path is not an error
        return {}

    @staticmethod
    def _fs_event(ev: object) -> dict:
        ev = ev if isinstance(ev, dict) else {}
        kind = ev.get("type")
        out: dict = {"name": _str(ev.get("name")),
                     "type": EVENT_TYPES.get(kind, "EVENT_TYPE_UNSPECIFIED") if isinstance(kind, str)
                     else "EVENT_TYPE_UNSPECIFIED"}
        if ev.get("entry"):
            out["entry"] = entry_json(ev["entry"])
        return out

    async def _watch_dir(self, req: dict, receive: Receive, out: c.ServerStream, sid: str,
                         agent: AsyncAgentClient, user: str, headers: dict[str, str], deadline: c.Deadline) -> None:
        events = await agent.watch(self._path(req), _flag(req.get("recursive"), "recursive"), user,
                                   include_entry=_flag(req.get("includeEntry"), "includeEntry"))
        await out.send_message({"start": {}})

        async def handle(ev: object) -> bool:
            await out.send_message({"filesystem": self._fs_event(ev)})  # type: ignore[arg-type]
            return False

        relay = Relay(receive, out, deadline, {"keepalive": {}}, self._keepalive(headers))
        why = await relay.run(events, handle, weigh=lambda _ev: 512)
        if why == "deadline":
            raise c.ConnectError("deadline_exceeded", "the watch's deadline passed")

    async def _create_watcher(self, req: dict, sid: str, agent: AsyncAgentClient, user: str) -> dict:
        self._expire_watchers()
        events = await agent.watch(self._path(req), _flag(req.get("recursive"), "recursive"), user,
                                   include_entry=_flag(req.get("includeEntry"), "includeEntry"))
        wid = uuid.uuid4().hex
        watcher = Watcher(sid)

        async def collect() -> None:
            try:
                async for ev in events:
                    if len(watcher.events) < WATCHER_MAX_EVENTS:
                        watcher.events.append(self._fs_event(ev))
            except ShoalError as exc:
                watcher.error = exc.message
            finally:
                with contextlib.suppress(BaseException):
                    await events.aclose()  # type: ignore[attr-defined]

        watcher.task = asyncio.create_task(collect())
        self.watchers[wid] = watcher
        return {"watcherId": wid}

    def _watcher(self, req: dict, sid: str) -> tuple[str, Watcher]:
        wid = req.get("watcherId")
        watcher = self.watchers.get(wid) if isinstance(wid, str) else None
        if watcher is None or watcher.sandbox_id != sid:  # another sandbox's watcher does not exist here
            raise c.ConnectError("not_found", f"watcher {wid} not found")
        watcher.used = time.monotonic()
        return wid, watcher  # type: ignore[return-value]

    async def _get_watcher_events(self, req: dict, sid: str, agent: AsyncAgentClient, user: str) -> dict:
        _wid, watcher = self._watcher(req, sid)
        await asyncio.sleep(0)  # let the collector take what the agent has sent
        events, watcher.events = watcher.events, []
        if not events and watcher.error:
            raise c.ConnectError("internal", watcher.error)
        return {"events": events}

    async def _remove_watcher(self, req: dict, sid: str, agent: AsyncAgentClient, user: str) -> dict:
        wid, watcher = self._watcher(req, sid)
        self.watchers.pop(wid, None)
        if watcher.task is not None:
            watcher.task.cancel()
        return {}

    def _expire_watchers(self) -> None:
        now = time.monotonic()
        for wid, w in list(self.watchers.items()):
            if now - w.used > WATCHER_IDLE:
                self.watchers.pop(wid, None)
                if w.task is not None:
                    w.task.cancel()

    # --- /files ----------------------------------------------------------------------------------------
    async def _files_user(self, sid: str, agent: AsyncAgentClient, headers: dict[str, str], query: dict) -> str:
        return await self._user(sid, agent, query.get("username") or _basic_user(headers))

    async def _download(self, send: Send, sid: str, agent: AsyncAgentClient, headers: dict[str, str],
                        query: dict) -> None:
        path = query.get("path")
        if not path:
            await send_json(send, 400, {"code": 400, "message": "path is required"})
            return
        try:
            user = await self._files_user(sid, agent, headers, query)
            entry, chunks = await agent.read_file(path, user)
        except ShoalError as exc:
            await send_json(send, _http_status(exc), {"code": _http_status(exc), "message": exc.message})
            return
        gzip = "gzip" in headers.get("accept-encoding", "")
        name = urllib.parse.quote(entry.get("name") or posixpath.basename(path))
        out = [(b"content-type", b"application/octet-stream"),
               (b"content-disposition", f"attachment; filename*=UTF-8''{name}".encode())]
        if gzip:
            out.append((b"content-encoding", b"gzip"))
            comp = zlib.compressobj(6, zlib.DEFLATED, 31)
        else:
            out.append((b"content-length", str(int(entry.get("size") or 0)).encode()))
            comp = None
        await send({"type": "http.response.start", "status": 200, "headers": out})
        left = int(entry.get("size") or 0)  # a file that grows meanwhile is sent as it was at open
        try:
            async for chunk in chunks:
                if comp is None:
                    chunk, left = chunk[:left], left - min(left, len(chunk))
                data = comp.compress(chunk) if comp else chunk
                if data:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            tail = comp.flush() if comp else b""
            await send({"type": "http.response.body", "body": tail, "more_body": False})
        except (ShoalError, OSError):
            # the head is out: all we can do is cut the body short, which the client sees as an error
            log.warning("download of %s from %s failed midway", path, sid)
            with contextlib.suppress(Exception):
                await chunks.aclose()  # type: ignore[attr-defined]
            raise

    def _budget(self, sid: str) -> uploads.Budget:
        upper = self.engine.settings.sandboxes_dir / sid / "upper"  # the sandbox's writable layer (tmpfs)
        return uploads.Budget(uploads.max_upload(), uploads.free_space(upper))

    async def _upload(self, receive: Receive, send: Send, sid: str, agent: AsyncAgentClient,
                      headers: dict[str, str], query: dict, signed: bool) -> None:
        """Streamed to the agent within the sandbox's budget (``uploads``). Through a signed URL,
        exactly one file is written, to the signed ``path``."""
        ctype = headers.get("content-type", "")
        path = query.get("path")
        try:
            budget = self._budget(sid)
            declared = headers.get("content-length", "")
            gzip = "gzip" in headers.get("content-encoding", "").lower()
            if declared.isdigit() and not gzip:
                budget.check_declared(int(declared) - (uploads.MULTIPART_OVERHEAD
                                                       if ctype.lower().startswith("multipart/") else 0))
            if signed and not path:
                raise InvalidRequest("a signed upload URL must name its path")
            user = await self._files_user(sid, agent, headers, query)
            meta = file_metadata.from_headers(headers)
            written: list[dict] = []
            if ctype.lower().startswith("multipart/form-data"):
                reader = uploads.MultipartReader(receive, ctype, budget)
                async for part in reader.parts():
                    if part.name != "file":
                        continue
                    if path and written:
                        raise InvalidRequest("path names one file: name each file of a multi-file upload "
                                             "by its filename instead")
                    target = path or part.filename
                    if not target:
                        raise InvalidRequest("every file part needs a filename (its path) when path is not given")
                    written.append(await agent.write_file(_text(target, "the file's path"), part.chunks(),
                                                          user=user, metadata=meta))
                if not written:
                    raise InvalidRequest("no part named 'file' in the upload")
            else:
                if not path:
                    raise InvalidRequest("path is required for an octet-stream upload")
                written.append(await agent.write_file(path, uploads.octet_stream(receive, budget, gzip), user=user,
                                                      metadata=meta))
        except c.ConnectError as exc:
            await send_json(send, 400, {"code": 400, "message": exc.message})
            return
        except ShoalError as exc:
            status = _http_status(exc)
            await send_json(send, status, {"code": status, "message": exc.message})
            return
        await send_json(send, 200, [_written(e) for e in written])


_STREAMS = {
    "process.Process/Start": "_start",
    "process.Process/Connect": "_connect",
    "process.Process/StreamInput": "_stream_input",
    "filesystem.Filesystem/WatchDir": "_watch_dir",
}
_UNARY = {
    "process.Process/List": "_list",
    "process.Process/SendInput": "_send_input",
    "process.Process/SendSignal": "_send_signal",
    "process.Process/CloseStdin": "_close_stdin",
    "process.Process/Update": "_update",
    "filesystem.Filesystem/Stat": "_stat",
    "filesystem.Filesystem/MakeDir": "_make_dir",
    "filesystem.Filesystem/Move": "_move",
    "filesystem.Filesystem/ListDir": "_list_dir",
    "filesystem.Filesystem/Remove": "_remove",
    "filesystem.Filesystem/CreateWatcher": "_create_watcher",
    "filesystem.Filesystem/GetWatcherEvents": "_get_watcher_events",
    "filesystem.Filesystem/RemoveWatcher": "_remove_watcher",
}


class SignedFiles:
    """``/files?...&signature=v1_...`` without sandbox headers: what ``download_url()``/``upload_url()``
    give when ``E2B_SANDBOX_URL`` points at the daemon (the URL names no sandbox). The signature is
    made with one sandbox's access token, so the sandbox is the one whose token verifies it.

    Mounted as the daemon's ``/files`` route (``wing.E2B.install``): it sees those requests only,
    never the native API's."""

    def __init__(self, envd: EnvdApp) -> None:
        self.envd = envd

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        query = _query(scope)
        op = "read" if scope["method"] == "GET" else "write"
        tokens, engine = self.envd.tokens, self.envd.engine
        for rec in engine.list():
            if signing.matches(tokens.envd(rec.id), query.get("path", ""), op, query.get("username"),
                               query.get("signature"), query.get("signature_expiration")):
                return await self.envd({**scope, "shoal.sandbox_id": rec.id, "shoal.port": ENVD_PORT}, receive, send)
        await send_json(send, 401, {"code": 401, "message": "invalid or missing file URL signature"})
