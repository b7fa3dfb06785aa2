"""E2B's code interpreter (port 49999) for every sandbox, relayed to a server inside the sandbox.

Requests reach this app through ``SandboxRouting`` (``E2b-Sandbox-Port: 49999`` or a
``49999-<id>.<domain>`` Host), with the sandbox in ``scope["shoal.sandbox_id"]``.

Design: the interpreter runs *inside* the sandbox (``shoal/inside/kernel_server.py``: stdlib + jupyter_client,
one ipykernel per context) and speaks E2B's own HTTP API on 127.0.0.1:49999 there. This app checks
the caller, then relays the request and streams the response back over the agent's
``port.connect`` (the sandbox has only loopback; the agent dials in for us). So the wire format
is produced in exactly one place, kernels live and die with their sandbox (nothing in the daemon
to leak or to lose on a daemon restart), a process in the sandbox can use the same API on
localhost, and requests for sandbox A cannot reach B: each goes through A's own agent socket.

Lifecycle: the server is started as root (cwd /home/user, tag ``shoal-code-interpreter``), as
E2B runs its kernels: E2B code may ``cd /root`` or create a context there. Sandbox root is already
an unprivileged host uid, and nothing the server answers is trusted here (see ``_relay``).
* eagerly, in a background thread, when the daemon creates a sandbox of ``code-interpreter-v1``
  (or a template built on it); it starts the default Python kernel at once, so the first execute
  after create waits at most for what is left of a kernel start (under a second here);
* lazily, on any interpreter request that finds nothing listening (a sandbox made before the
  daemon started, or one whose server was killed). The sources (``shoal/inside``: the server and
  its language modules) are uploaded by the agent's file write each time it is started (to
  ``/opt/shoal/``), so the server always matches this daemon, whatever image the template was built with.

Auth (as envd, ``security.Tokens``): the SDK sends ``X-Access-Token`` (the envdAccessToken) on
``/execute`` and ``E2B-Traffic-Access-Token`` (the trafficAccessToken) on every call; either one,
valid for this sandbox, is enough. Neither is forwarded into the sandbox.

Errors of this app (not of the server) are E2B's ``{"code", "message"}``: 401 without a valid
token, 502 when the sandbox is gone or paused, or its interpreter cannot start (E2B's proxy
answers 502 too; the SDK reads it as "sandbox timed out / not running").
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from pathlib import Path

from shoal.engine import Engine
from shoal.errors import NotFound, RuntimeFailure, ShoalError
from shoal.runtime.agent_aio import AsyncAgentClient
from shoal.runtime.agent_client import AgentClient, ProcessStream
from shoal.server.asgi import error, header
from shoal.server.e2b.security import Tokens
from shoal.server.gate import Gate
from shoal.server.sandbox_routing import traffic_agent

log = logging.getLogger("shoal.e2b.interpreter")

PORT = 49999
TEMPLATE = "code-interpreter-v1"
SERVER_DIR = "/opt/shoal"
SERVER_PATH = f"{SERVER_DIR}/kernel_server.py"
#: Uploaded beside the server: the modules it imports and the files its kernels run.
SERVER_FILES = ("kernel_server.py", "languages.py", "node_context.py", "python_startup.py", "js_kernel.js")
SERVER_USER = "root"
SERVER_CWD = "/home/user"
TAG = "shoal-code-interpreter"
READY = b"shoal-code-interpreter ready"
#: How long the server may take to print its ready line (it listens before starting a kernel).
START_TIMEOUT = 30.0
MAX_BODY = 64 * 1024 * 1024
CHUNK = 64 * 1024
#: The server in the sandbox is sandbox code: its response head is bounded like any hostile input.
MAX_RESPONSE_HEADERS = 100
#: The last line of every complete ``/execute`` stream (kernel_server.py writes it even after an error).
END_OF_EXECUTION = "end_of_execution"
#: Never forwarded into the sandbox: hop-by-hop, re-made below, or secrets of the caller.
_DROP_REQUEST = {b"host", b"connection", b"keep-alive", b"content-length", b"transfer-encoding", b"te", b"trailer",
                 b"upgrade", b"proxy-authorization", b"authorization", b"x-api-key", b"x-access-token",
                 b"e2b-traffic-access-token", b"e2b-sandbox-id", b"e2b-sandbox-port"}
_DROP_RESPONSE = {b"connection", b"keep-alive", b"transfer-encoding"}

#: Read from the package, written into the sandbox: never imported by the host.
INSIDE = Path(__file__).resolve().parents[2] / "inside"
_sources: dict[str, bytes] = {}


def server_sources() -> dict[str, bytes]:
    """The in-sandbox server's files by name (``shoal/inside``: code that runs in sandboxes)."""
    if not _sources:
        _sources.update({name: (INSIDE / name).read_bytes() for name in SERVER_FILES})
    return _sources


def server_source() -> bytes:
    """The server's own source (``shoal/inside/kernel_server.py``)."""
    return server_sources()["kernel_server.py"]


def authorize(scope: dict, tokens: Tokens) -> bool:
    """The E2B auth hook: a valid envd access token or traffic access token for this sandbox."""
    sid = scope.get("shoal.sandbox_id") or ""
    return tokens.check_either(sid, header(scope, b"x-access-token"), header(scope, b"e2b-traffic-access-token"))


# --- starting the server in a sandbox (blocking; runs in threads) ----------------------------------

def _listening(agent: AgentClient) -> bool:
    try:
        agent.call({"op": "port.connect", "port": PORT, "host": "127.0.0.1"}, timeout=10)
        return True
    except NotFound:
        return False


class Launcher:
    """Starts the kernel server in a sandbox at most once at a time (per-sandbox lock)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def _lock(self, sandbox_id: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(sandbox_id, threading.Lock())

    def forget(self, sandbox_id: str) -> None:
        with self._guard:
            self._locks.pop(sandbox_id, None)

    def ensure(self, sandbox_id: str) -> None:
        """Return once something listens on the interpreter port in the sandbox, starting the
        server if nothing does. Raises a ShoalError saying why it could not start."""
        with self._lock(sandbox_id):
            agent = self.engine.agent(sandbox_id)  # RUNNING only
            agent.wait_ready(timeout=10)
            if _listening(agent):
                return
            for name, source in server_sources().items():
                agent.write_file(f"{SERVER_DIR}/{name}", source, user="root", mode=0o644)
            conn = agent.connect(timeout=START_TIMEOUT)
            try:
                conn.send({"op": "process.start", "cmd": ["python3", SERVER_PATH], "user": SERVER_USER,
                           "cwd": SERVER_CWD, "tag": TAG})
                stream = ProcessStream(conn)
                out, err = bytearray(), bytearray()
                for ev in stream:
                    if ev.kind == "stdout":
                        out += ev.data
                        if READY in out:
                            log.debug("code interpreter started", extra={"sandbox": sandbox_id})
                            return  # closing the connection leaves the server running
                    elif ev.kind == "stderr":
                        err = (err + ev.data)[-4096:]
                    elif ev.kind == "end":
                        if _listening(agent):  # lost a race with another starter: fine
                            return
                        last = err.decode("utf-8", "replace").strip().splitlines()
                        raise RuntimeFailure(f"the code interpreter exited at start (code {ev.end['exit_code']})"
                                             + (f": {last[-1]}" if last else ""), sandbox_id=sandbox_id)
            finally:
                conn.close()


# --- the ASGI app ------------------------------------------------------------------------------------

class _Ending:
    """Whether a relayed response arrived whole. The server closes every connection, so an EOF alone
    says nothing: a body shorter than its Content-Length, or an NDJSON execution stream whose last line
    is not ``end_of_execution``, was cut short."""

    def __init__(self, headers: list[tuple[bytes, bytes]]) -> None:
        fields = dict(headers)
        length = fields.get(b"content-length", b"")
        self.length = int(length) if length.isdigit() else None
        self.ndjson = fields.get(b"content-type", b"").startswith(b"application/x-ndjson")
        self.received = 0
        self.tail = b""

    def saw(self, chunk: bytes) -> None:
        self.received += len(chunk)
        self.tail = (self.tail + chunk)[-256:]

    def complete(self) -> bool:
        if self.length is not None and self.received < self.length:
            return False
        if self.ndjson:
            last = self.tail.rstrip().rsplit(b"\n", 1)[-1]
            try:
                return json.loads(last).get("type") == END_OF_EXECUTION
            except (ValueError, AttributeError):
                return False
        return True


class _TooLarge(Exception):
    pass


async def _read_body(receive) -> bytes:  # noqa: ANN001
    body = bytearray()
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ConnectionResetError("client left")
        body += msg.get("body", b"")
        if len(body) > MAX_BODY:
            raise _TooLarge
        if not msg.get("more_body"):
            return bytes(body)


class InterpreterApp:
    """ASGI app for port 49999 of every sandbox. ``prestart``: start the server in new
    ``code-interpreter-v1`` sandboxes as they are created (see the module docstring)."""

    def __init__(self, gate: Gate, tokens: Tokens, *, prestart: bool = True) -> None:
        self.gate, self.tokens = gate, tokens
        engine = self.engine = gate.engine
        self.launcher = Launcher(engine)
        self._unsubscribe = engine.subscribe(self._on_event) if prestart else None

    def close(self) -> None:
        """Stop following the engine's events (servers already started keep running)."""
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    # --- eager start -------------------------------------------------------------------------------
    def has_interpreter(self, template: str) -> bool:
        """``code-interpreter-v1`` or a template built on it."""
        recipes = self.engine.templates.recipes
        for _ in range(10):
            if template == TEMPLATE:
                return True
            recipe = recipes.get(template)
            if recipe is None or recipe.parent is None:
                return False
            template = recipe.parent
        return False

    def _on_event(self, event: dict) -> None:
        sandbox = event.get("sandbox") or {}
        sid = sandbox.get("id")
        if not sid:
            return
        if event.get("type") == "created" and self.has_interpreter(str(sandbox.get("template"))):
            threading.Thread(target=self._prestart, args=(sid,), name=f"shoal-interpreter-{sid}",
                             daemon=True).start()
        elif event.get("type") in ("deleted", "expired"):
            self.launcher.forget(sid)

    def _prestart(self, sandbox_id: str) -> None:
        try:
            self.launcher.ensure(sandbox_id)
        except Exception as exc:  # noqa: BLE001 - the first request retries and reports it
            log.info("code interpreter did not pre-start: %s", exc, extra={"sandbox": sandbox_id})

    # --- requests ----------------------------------------------------------------------------------
    async def __call__(self, scope: dict, receive, send) -> None:  # noqa: ANN001
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 4404})
            return
        if scope["type"] != "http":
            return
        sid = scope.get("shoal.sandbox_id") or ""
        if not authorize(scope, self.tokens):
            await error(send, 401, "invalid or missing X-Access-Token "
                        "or E2B-Traffic-Access-Token")
            return
        agent, problem = traffic_agent(self.gate, sid)
        if agent is None:
            await error(send, 502, problem)
            return
        try:
            body = await _read_body(receive)
        except _TooLarge:
            await error(send, 413, f"request body over {MAX_BODY} bytes")
            return
        except ConnectionResetError:
            return
        try:
            reader, writer = await self._open(sid, agent)
        except ShoalError as exc:
            await error(send, 502, f"the code interpreter of sandbox {sid} "
                        f"is not available: {exc.message}")
            return
        try:
            await self._relay(scope, body, reader, writer, receive, send)
        finally:
            writer.close()

    async def _open(self, sid: str, agent: AsyncAgentClient
                    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await agent.open_port(PORT)
        except NotFound:
            pass  # nothing listens yet: start the server (or wait for the pre-start in progress)
        await asyncio.to_thread(self.launcher.ensure, sid)
        return await agent.open_port(PORT)

    async def _relay(self, scope: dict, body: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     receive, send) -> None:  # noqa: ANN001
        target = scope.get("raw_path") or scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        head = [scope["method"].encode() + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1:%d" % PORT,
                b"Connection: close", b"Content-Length: %d" % len(body)]
        head += [name + b": " + value for name, value in scope["headers"] if name.lower() not in _DROP_REQUEST]
        try:
            writer.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
            await writer.drain()
            status_line = await reader.readline()
            status = int(status_line.split(b" ", 2)[1])
            if not 100 <= status <= 599:  # the sandbox answers this: anything else is not HTTP
                raise ValueError(f"invalid status {status}")
            headers = []
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b"\n"):
                    break
                if not line:
                    raise ConnectionResetError("response head cut short")
                if len(headers) >= MAX_RESPONSE_HEADERS:
                    raise ValueError("too many response headers")
                name, _, value = line.partition(b":")
                if not name.strip() or not name.strip().isascii() or b" " in name.strip():
                    raise ValueError("malformed response header")
                if name.strip().lower() not in _DROP_RESPONSE:
                    headers.append((name.strip().lower(), value.strip()))
        except (OSError, ValueError, IndexError) as exc:
            await error(send, 502, f"the code interpreter of sandbox "
                        f"{scope.get('shoal.sandbox_id')} failed: {exc}")
            return
        await send({"type": "http.response.start", "status": status, "headers": headers})

        async def watch_disconnect() -> None:
            # The client left (e.g. the SDK's execution timeout): closing our side makes the server
            # see EOF and interrupt the kernel.
            while (await receive())["type"] != "http.disconnect":
                pass
            writer.close()

        watcher = asyncio.create_task(watch_disconnect())
        ending = _Ending(headers)
        try:
            while True:
                try:
                    chunk = await reader.read(CHUNK)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                ending.saw(chunk)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            if not ending.complete():
                # Cut short (the sandbox was killed or paused, its server died): return without ending
                # the response, so the server drops the connection mid-body. The SDK then checks the
                # sandbox and says it was killed; a clean end would read as an empty, error-free result.
                log.info("code interpreter response cut short", extra={"sandbox": scope.get("shoal.sandbox_id")})
                reset = (scope.get("extensions") or {}).get("shoal.reset", {}).get("reset")
                if reset is not None:
                    reset()  # a TCP reset: every HTTP client reads it as the transport failing
                return
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()
