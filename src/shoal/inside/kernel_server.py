"""The code interpreter inside a sandbox: E2B's port-49999 HTTP API in front of Jupyter kernels.

This file runs INSIDE the sandbox (Python 3.11, stdlib + ``jupyter_client`` only; ipykernel is the
kernel). The daemon uploads it and starts it as ``user`` (see ``interpreter.py``); it listens on
127.0.0.1:49999, and the daemon relays E2B clients' requests to it byte for byte.

API (what E2B's code interpreter server answers)::

    GET    /health                     "OK"
    POST   /execute                    {"code", "context_id"?, "language"?, "env_vars"?} -> NDJSON lines
    POST   /contexts                   {"language"?, "cwd"?} -> {"id", "language", "cwd"}
    GET    /contexts                   [{"id", "language", "cwd"}, ...]
    DELETE /contexts/{id}              null
    POST   /contexts/{id}/restart      null

Execute streams one JSON object per line: ``stdout``/``stderr`` {text, timestamp}, ``result``
{text, html, markdown, svg, png, jpeg, pdf, latex, json, javascript, data, extra, is_main_result},
``error`` {name, value, traceback}, ``number_of_executions`` {execution_count}, and always last
``end_of_execution``. One kernel per context, state kept across calls; a default Python context
is started with the server so the first execute only waits for it.

If the client goes away mid-execution the kernel is interrupted (the SDK closes the connection on
its execution timeout). ``env_vars`` apply to one execution: set before it, restored after it.
Every response closes its connection (HTTP/1.1 with ``Connection: close``).
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import signal
import sys
import uuid

os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")  # before jupyter_client: no deprecation warning

HOST = "127.0.0.1"
PORT = int(os.environ.get("SHOAL_INTERPRETER_PORT", "49999"))
READY = "shoal-code-interpreter ready"
DEFAULT_CWD = os.environ.get("HOME") or "/home/user"
#: Languages this server runs, by the names clients use, to the kernel that runs them.
KERNELS = {"python": "python3", "python3": "python3"}
MAX_BODY = 64 * 1024 * 1024
#: How often an execution that hears nothing checks that its kernel is still alive.
LIVENESS_INTERVAL = 1.0
#: After the kernel reports idle, how long to wait for a late execute_reply.
REPLY_GRACE = 2.0
#: MIME type of a display bundle -> field of an E2B result.
MIME_FIELDS = {
    "text/html": "html", "text/markdown": "markdown", "image/svg+xml": "svg", "image/png": "png",
    "image/jpeg": "jpeg", "application/pdf": "pdf", "text/latex": "latex", "application/json": "json",
    "application/javascript": "javascript", "e2b/data": "data", "e2b/chart": "chart",
}
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 413: "Payload Too Large",
            500: "Internal Server Error"}


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# --- E2B output lines ------------------------------------------------------------------------------

def _timestamp(msg: dict) -> str:
    date = msg.get("header", {}).get("date")
    if isinstance(date, datetime.datetime):
        if date.tzinfo is None:
            date = date.replace(tzinfo=datetime.UTC)
        return date.isoformat()
    if isinstance(date, str) and date:
        return date
    return datetime.datetime.now(datetime.UTC).isoformat()


def result_line(bundle: dict, is_main_result: bool) -> dict:
    """A Jupyter MIME bundle as an E2B ``result`` line (unknown MIME types go to ``extra``)."""
    data = dict(bundle)
    line: dict = {"type": "result"}
    text = data.pop("text/plain", None)
    if isinstance(text, str) and len(text) >= 2 and text.startswith("'") and text.endswith("'"):
        text = text[1:-1]  # a str's repr, as E2B shows it
    if text is not None:
        line["text"] = text
    for mime, field in MIME_FIELDS.items():
        value = data.pop(mime, None)
        if value is not None:
            line[field] = value
    if data:
        line["extra"] = data
    line["is_main_result"] = is_main_result
    return line


def error_line(name: str, value: str, traceback: list | str = "") -> dict:
    if isinstance(traceback, list):
        traceback = "\n".join(str(t) for t in traceback)
    return {"type": "error", "name": name, "value": value, "traceback": traceback}


def _env_code(values: dict[str, str | None]) -> str:
    """Python that sets (str) or removes (None) each variable in the kernel's os.environ."""
    sets = {k: v for k, v in values.items() if v is not None}
    drops = [k for k, v in values.items() if v is None]
    code = ["import os as __shoal_os"]
    if sets:
        code.append(f"__shoal_os.environ.update({sets!r})")
    for key in drops:
        code.append(f"__shoal_os.environ.pop({key!r}, None)")
    code.append("del __shoal_os")
    return "\n".join(code)


# --- contexts --------------------------------------------------------------------------------------

_RESTARTED = object()  # put in an execution's queue when its kernel restarts under it


class Context:
    """One kernel and the executions waiting for its messages (routed by parent msg_id)."""

    def __init__(self, language: str, cwd: str) -> None:
        self.id = str(uuid.uuid4())
        self.language = language
        self.cwd = cwd
        from jupyter_client.manager import AsyncKernelManager  # here: the module is importable without it

        self.km = AsyncKernelManager(kernel_name=KERNELS[language])
        self.kc = None
        self.lock = asyncio.Lock()  # one execution at a time, env set-up and restore included
        self.ready = asyncio.Event()  # the kernel is up and its channels connected
        self.waiting: dict[str, asyncio.Queue] = {}
        self.pumps: list[asyncio.Task] = []
        self.running: str | None = None  # msg_id of the user's execution the kernel is on
        self.generation = 0  # bumped by every restart

    def info(self) -> dict:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    async def start(self) -> None:
        await self.km.start_kernel(cwd=self.cwd)
        await self._connect()
        self.ready.set()

    async def _connect(self) -> None:
        kc = self.km.client()
        kc.start_channels()
        try:
            await kc.wait_for_ready(timeout=60)
        except RuntimeError:
            kc.stop_channels()
            raise
        self.kc = kc
        self.pumps = [asyncio.create_task(self._pump(kc.get_iopub_msg, "iopub")),
                      asyncio.create_task(self._pump(kc.get_shell_msg, "shell"))]

    async def _pump(self, get, channel: str) -> None:
        while True:
            msg = await get()
            queue = self.waiting.get(msg.get("parent_header", {}).get("msg_id"))
            if queue is not None:
                queue.put_nowait((channel, msg))

    async def _disconnect(self) -> None:
        for task in self.pumps:
            task.cancel()
        for task in self.pumps:
            try:
                await task
            except (asyncio.CancelledError, Exception):  # noqa: BLE001 - a pump only ever ends this way
                pass
        self.pumps = []
        if self.kc is not None:
            self.kc.stop_channels()
            self.kc = None

    def _abandon_waiting(self) -> None:
        self.generation += 1
        for queue in self.waiting.values():
            queue.put_nowait(("", _RESTARTED))

    async def restart(self) -> None:
        self.ready.clear()
        try:
            self._abandon_waiting()
            await self._disconnect()
            await self.km.restart_kernel(now=True)
            await self._connect()
        finally:
            self.ready.set()  # even after a failure: waiting executions then report it

    async def shutdown(self) -> None:
        self._abandon_waiting()
        await self._disconnect()
        try:
            await self.km.shutdown_kernel(now=True)
        except Exception:  # noqa: BLE001 - the kernel may be gone already
            pass

    async def interrupt(self, msg_id: str) -> None:
        """Interrupt the kernel if it is still running ``msg_id`` (its client went away)."""
        if self.running == msg_id:
            try:
                await self.km.interrupt_kernel()
            except Exception:  # noqa: BLE001 - the kernel may have died meanwhile
                pass

    def _send(self, code: str, silent: bool) -> tuple[str, asyncio.Queue]:
        msg = self.kc.session.msg("execute_request", {
            "code": code, "silent": silent, "store_history": not silent, "user_expressions": {},
            "allow_stdin": False, "stop_on_error": True})
        msg_id = msg["header"]["msg_id"]
        queue: asyncio.Queue = asyncio.Queue()
        self.waiting[msg_id] = queue  # before sending: the first reply may come at once
        self.kc.shell_channel.send(msg)
        return msg_id, queue

    async def _run(self, code: str, silent: bool, emit) -> None:  # noqa: ANN001
        """Send one execute_request and hand its outputs to ``emit`` until the kernel is done."""
        msg_id, queue = self._send(code, silent)
        if not silent:
            self.running = msg_id
        idle = replied = errored = False
        try:
            while not (idle and replied):  # outputs (iopub) may arrive after the reply (shell)
                try:
                    channel, msg = await asyncio.wait_for(queue.get(), REPLY_GRACE if idle else LIVENESS_INTERVAL)
                except TimeoutError:
                    if idle:
                        break  # the reply is late or lost; the kernel said it is done
                    if not await self.km.is_alive():
                        emit(error_line("ContextRestarting", "Context was restarted (the kernel died)"))
                        asyncio.create_task(self.restart())
                        return
                    continue
                if msg is _RESTARTED:
                    emit(error_line("ContextRestarting", "Context was restarted"))
                    return
                kind, content = msg["msg_type"], msg["content"]
                if channel == "shell":
                    if kind != "execute_reply":
                        continue
                    replied = True
                    status = content.get("status")
                    if status == "abort" or status == "aborted":
                        emit(error_line("ExecutionAborted", "Execution was aborted"))
                    elif status == "error" and not errored:
                        errored = True
                        emit(error_line(content.get("ename", ""), content.get("evalue", ""),
                                        content.get("traceback", [])))
                elif kind == "stream":
                    emit({"type": "stderr" if content.get("name") == "stderr" else "stdout",
                          "text": content.get("text", ""), "timestamp": _timestamp(msg)})
                elif kind == "execute_result":
                    emit(result_line(content.get("data", {}), True))
                elif kind == "display_data":
                    emit(result_line(content.get("data", {}), False))
                elif kind == "error":
                    if not errored:
                        errored = True
                        emit(error_line(content.get("ename", ""), content.get("evalue", ""),
                                        content.get("traceback", [])))
                elif kind == "execute_input":
                    emit({"type": "number_of_executions", "execution_count": content.get("execution_count")})
                elif kind == "status" and content.get("execution_state") == "idle":
                    idle = True
        finally:
            self.waiting.pop(msg_id, None)
            if self.running == msg_id:
                self.running = None

    async def execute(self, code: str, env_vars: dict[str, str], emit) -> None:  # noqa: ANN001
        """Run ``code`` with ``env_vars`` set for its duration; every output line goes to ``emit``."""
        async with self.lock:
            await self.ready.wait()
            if self.kc is None:
                emit(error_line("ContextNotReady", "the context's kernel is not running"))
                return
            generation = self.generation
            if env_vars:
                await self._run(_env_code(env_vars), True, lambda line: None)
            await self._run(code, False, emit)
            if env_vars and generation == self.generation and self.kc is not None:
                # Back to what the kernel inherited from this server, like E2B's global env vars.
                await self._run(_env_code({k: os.environ.get(k) for k in env_vars}), True, lambda line: None)


class Interpreter:
    """Every context of this sandbox, and the default one per language."""

    def __init__(self) -> None:
        self.contexts: dict[str, Context] = {}
        self.defaults: dict[str, asyncio.Task] = {}

    async def create(self, language: str, cwd: str) -> Context:
        ctx = Context(language, cwd)
        try:
            await ctx.start()
        except Exception:
            await ctx.shutdown()
            raise
        self.contexts[ctx.id] = ctx
        return ctx

    async def default(self, language: str) -> Context:
        """The default context of ``language``, started on first use (Python's at server start)."""
        task = self.defaults.get(language)
        if task is not None and task.done() and (task.cancelled() or task.exception() is not None
                                                 or task.result().id not in self.contexts):
            task = None  # failed to start, or deleted by a client: start another one
        if task is None:
            task = asyncio.create_task(self.create(language, DEFAULT_CWD))
            self.defaults[language] = task
        return await asyncio.shield(task)

    def get(self, context_id: str) -> Context:
        ctx = self.contexts.get(context_id)
        if ctx is None:
            raise HTTPError(404, f"Context {context_id} not found")
        return ctx

    async def close(self) -> None:
        await asyncio.gather(*(ctx.shutdown() for ctx in self.contexts.values()), return_exceptions=True)


def _language(value: object) -> str:
    if value is not None and not isinstance(value, str):
        raise HTTPError(400, "language must be a string")
    language = (value or "python").strip().lower()
    if language not in KERNELS:
        raise HTTPError(400, f"Language '{language}' is not supported: this sandbox runs Python only")
    return "python"


# --- HTTP ------------------------------------------------------------------------------------------

async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, _version = lines[0].split(" ", 2)
    except ValueError:
        raise HTTPError(400, "malformed request line") from None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = bytearray()
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (await reader.readline()) not in (b"\r\n", b"\n", b""):
                    pass  # trailers
                break
            if len(body) + size > MAX_BODY:
                raise HTTPError(413, "request body too large")
            body += await reader.readexactly(size)
            await reader.readline()
        return method, target, headers, bytes(body)
    length = int(headers.get("content-length") or 0)
    if length > MAX_BODY:
        raise HTTPError(413, "request body too large")
    return method, target, headers, await reader.readexactly(length) if length else b""


def _head(status: int, content_type: str | None, length: int | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}", "Connection: close"]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _respond(writer: asyncio.StreamWriter, status: int, body: object, *, text: bool = False) -> None:
    data = (str(body) if text else json.dumps(body)).encode()
    writer.write(_head(status, "text/plain; charset=utf-8" if text else "application/json", len(data)) + data)
    await writer.drain()


def _json_body(body: bytes) -> dict:
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except ValueError:
        raise HTTPError(400, "request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise HTTPError(400, "request body must be a JSON object")
    return data


class Server:
    def __init__(self) -> None:
        self.interpreter = Interpreter()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                method, target, _headers, body = await _read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return  # a connection that only checked we listen
            except (asyncio.LimitOverrunError, ValueError):
                raise HTTPError(400, "malformed request") from None
            await self.route(method, target.split("?", 1)[0], body, reader, writer)
        except HTTPError as exc:
            await self._try_respond(writer, exc.status, str(exc))
        except Exception as exc:  # noqa: BLE001 - the client gets a 500, the server goes on
            await self._try_respond(writer, 500, f"{type(exc).__name__}: {exc}")
        finally:
            writer.close()

    @staticmethod
    async def _try_respond(writer: asyncio.StreamWriter, status: int, message: str) -> None:
        try:
            await _respond(writer, status, message, text=True)
        except (ConnectionError, RuntimeError):
            pass

    async def route(self, method: str, path: str, body: bytes, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter) -> None:
        parts = [p for p in path.split("/") if p]
        if parts == ["health"] and method == "GET":
            return await _respond(writer, 200, "OK")
        if parts == ["execute"] and method == "POST":
            return await self.execute(_json_body(body), reader, writer)
        if parts == ["contexts"]:
            if method == "GET":
                return await _respond(writer, 200, [c.info() for c in self.interpreter.contexts.values()])
            if method == "POST":
                req = _json_body(body)
                language = _language(req.get("language"))
                cwd = req.get("cwd") or DEFAULT_CWD
                if not isinstance(cwd, str) or not os.path.isdir(cwd):
                    raise HTTPError(400, f"cwd {cwd!r} is not a directory")
                ctx = await self.interpreter.create(language, cwd)
                return await _respond(writer, 200, ctx.info())
        if len(parts) == 2 and parts[0] == "contexts" and method == "DELETE":
            ctx = self.interpreter.get(parts[1])
            del self.interpreter.contexts[ctx.id]
            await ctx.shutdown()
            return await _respond(writer, 200, None)
        if len(parts) == 3 and parts[0] == "contexts" and parts[2] == "restart" and method == "POST":
            await self.interpreter.get(parts[1]).restart()
            return await _respond(writer, 200, None)
        if parts in (["health"], ["execute"], ["contexts"]) or (parts[:1] == ["contexts"] and len(parts) in (2, 3)):
            raise HTTPError(405, f"{method} not allowed on {path}")
        raise HTTPError(404, f"no route {method} {path}")

    async def execute(self, req: dict, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        code = req.get("code")
        if not isinstance(code, str):
            raise HTTPError(400, "code must be a string")
        env_vars = req.get("env_vars") or {}
        if not isinstance(env_vars, dict) or not all(
                isinstance(k, str) and k and "=" not in k and "\0" not in k and isinstance(v, str) and "\0" not in v
                for k, v in env_vars.items()):
            raise HTTPError(400, "env_vars must map names to strings")
        context_id, language = req.get("context_id"), req.get("language")
        if context_id and language:
            raise HTTPError(400, "Only one of context_id or language can be provided")
        if context_id:
            ctx = self.interpreter.get(str(context_id))
        else:
            ctx = await self.interpreter.default(_language(language))

        lines: asyncio.Queue = asyncio.Queue()
        task = asyncio.create_task(ctx.execute(code, env_vars, lines.put_nowait))
        task.add_done_callback(lambda _t: lines.put_nowait(None))
        writer.write(_head(200, "application/x-ndjson"))
        gone = asyncio.create_task(reader.read(1))  # EOF (or anything) here: the client left
        try:
            while True:
                getter = asyncio.create_task(lines.get())
                done, _ = await asyncio.wait({getter, gone}, return_when=asyncio.FIRST_COMPLETED)
                if getter not in done:
                    getter.cancel()
                    break
                line = getter.result()
                if line is None:
                    if task.exception() is not None:
                        exc = task.exception()
                        writer.write(_encode(error_line(type(exc).__name__, str(exc))))
                    writer.write(_encode({"type": "end_of_execution"}))
                    await writer.drain()
                    return
                writer.write(_encode(line))
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            gone.cancel()
        # The client went away mid-execution: stop the code rather than let it run on unseen.
        running = ctx.running
        if running is not None and not task.done():
            await ctx.interrupt(running)


def _encode(line: dict) -> bytes:
    return (json.dumps(line, default=str) + "\n").encode()


async def main() -> int:
    try:
        import jupyter_client.manager  # noqa: F401 - fail now, not on the first request
    except ImportError as exc:
        print(f"shoal-code-interpreter: {exc} (this template has no Jupyter; use code-interpreter-v1)",
              file=sys.stderr, flush=True)
        return 2
    server = Server()
    try:
        listener = await asyncio.start_server(server.handle, HOST, PORT, limit=MAX_BODY, reuse_address=True)
    except OSError as exc:
        print(f"shoal-code-interpreter: cannot listen on {HOST}:{PORT}: {exc.strerror}", file=sys.stderr, flush=True)
        return 3
    # The default context starts now, so that the first execute waits only for what is left of it.
    default = asyncio.create_task(server.interpreter.default("python"))
    default.add_done_callback(lambda t: t.cancelled() or t.exception())  # errors surface on use
    print(f"{READY} on {HOST}:{PORT}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with listener:
        await stop.wait()
    await server.interpreter.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
