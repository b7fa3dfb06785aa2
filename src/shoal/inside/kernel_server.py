"""The code interpreter inside a sandbox: E2B's port-49999 HTTP API in front of Jupyter kernels.

This file runs INSIDE the sandbox (Python 3.11, stdlib + ``jupyter_client`` only). The daemon
uploads it with its siblings (``languages.py``, ``node_context.py``, ``python_startup.py``,
``js_kernel.js``) and starts it as root, as E2B runs its kernels (see ``interpreter.py``); it
listens on 127.0.0.1:49999, and the daemon relays E2B clients' requests to it byte for byte.

Languages (``languages.py``): Python, Bash and R run as Jupyter kernels (ipykernel, bash_kernel,
IRkernel, jjava), JavaScript and TypeScript as a node process of our own (``node_context.py``); what a template lacks
answers 400 naming the packages it needs.

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
``end_of_execution``. One kernel per context, state kept across calls; the default Python and
JavaScript contexts (E2B's two) start with the server, so the first execute only waits for what is
left of them, and ``GET /contexts`` waits for them too (a fresh sandbox lists both, like E2B's).
Contexts list in the order they were created, whichever finished starting first.

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

import languages
from node_context import NodeContext

os.environ.setdefault("JUPYTER_PLATFORM_DIRS", "1")  # before jupyter_client: no deprecation warning

HOST = "127.0.0.1"
PORT = int(os.environ.get("SHOAL_INTERPRETER_PORT", "49999"))
READY = "shoal-code-interpreter ready"
#: Where contexts start unless told otherwise: E2B's /home/user (the server itself runs as root).
DEFAULT_CWD = "/home/user" if os.path.isdir("/home/user") else (os.environ.get("HOME") or "/")
#: E2B's default contexts, started with the server and listed by a fresh sandbox.
DEFAULT_LANGUAGES = ("python", "javascript")
#: How long ``GET /contexts`` waits for the default contexts to finish starting.
DEFAULT_WAIT = 60.0
#: Python kernels run python_startup.py (E2B's data and chart formats) and print like E2B's.
PYTHON_KERNEL_ARGS = [
    f"--IPKernelApp.exec_lines=__import__('runpy').run_path({os.path.join(languages.HERE, 'python_startup.py')!r});",
    "--InteractiveShell.colors=NoColor", "--PlainTextFormatter.max_seq_length=0"]
MAX_BODY = 64 * 1024 * 1024
#: How often an execution that hears nothing checks that its kernel is still alive.
LIVENESS_INTERVAL = 1.0
#: After the kernel reports idle, how long to wait for a late execute_reply.
REPLY_GRACE = 2.0
#: Run silently after every Java cell: jjava can hold a cell's System.out until the next execution,
#: which then carries it (its output is the cell's, and handed on as such).
JAVA_FLUSH = "System.out.flush(); System.err.flush();"
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


# --- contexts --------------------------------------------------------------------------------------

_RESTARTED = object()  # put in an execution's queue when its kernel restarts under it


class Context:
    """One Jupyter kernel and the executions waiting for its messages (routed by parent msg_id)."""

    def __init__(self, language: str, cwd: str, context_id: str) -> None:
        self.id = context_id
        self.language = language
        self.cwd = cwd
        from jupyter_client.manager import AsyncKernelManager  # here: the module is importable without it

        self.km = AsyncKernelManager(kernel_name=languages.JUPYTER_KERNELS[language])
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
        extra = PYTHON_KERNEL_ARGS if self.language == "python" else []
        await self.km.start_kernel(cwd=self.cwd, extra_arguments=extra)
        await self._connect()
        await self._sandbox_env()
        self.ready.set()

    async def _sandbox_env(self) -> None:
        """A JVM cannot see later changes to its environment, so E2B's Java contexts read the sandbox's env
        vars as system properties: set them once the kernel is up (other kernels inherit the environment)."""
        if self.language == "java" and self.kc is not None:
            env = dict(list(os.environ.items())[:512])
            await self._run(languages.env_code("java", env), True, lambda line: None)

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
            await self._sandbox_env()
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
                    text = content.get("text", "")
                    if self.language == "java" and text.endswith("\n"):
                        text = text[:-1]  # E2B's Java kernel reports println's line without its newline
                    emit({"type": "stderr" if content.get("name") == "stderr" else "stdout",
                          "text": text, "timestamp": _timestamp(msg)})
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
                await self._run(languages.env_code(self.language, env_vars), True, lambda line: None)
            await self._run(code, False, emit)
            if self.language == "java" and generation == self.generation and self.kc is not None:
                await self._run(JAVA_FLUSH, True,
                                lambda line: emit(line) if line.get("type") in ("stdout", "stderr") else None)
            if env_vars and generation == self.generation and self.kc is not None:
                # Back to what the kernel inherited from this server, like E2B's global env vars.
                await self._run(languages.env_code(self.language, {k: os.environ.get(k) for k in env_vars}), True,
                                lambda line: None)


class Interpreter:
    """Every context of this sandbox, and the default one per language."""

    def __init__(self, catalog: languages.Catalog) -> None:
        self.catalog = catalog
        self.contexts: dict[str, Context | NodeContext] = {}
        self.defaults: dict[str, asyncio.Task] = {}
        self.order: dict[str, int] = {}  # context id -> when it was asked for (listing order)
        self._asked = 0

    def language(self, value: object) -> str:
        """The normalized language, if this sandbox runs it (else 400 saying what it needs)."""
        try:
            return self.catalog.check(languages.normalize(value))
        except languages.UnsupportedLanguage as exc:
            raise HTTPError(400, str(exc)) from None

    async def create(self, language: str, cwd: str) -> Context | NodeContext:
        context_id = str(uuid.uuid4())
        self._asked += 1
        self.order[context_id] = self._asked  # now, not when the kernel is up: a slow start keeps its place
        ctx = (NodeContext if language in languages.NODE_LANGUAGES else Context)(language, cwd, context_id)
        try:
            await ctx.start()
        except BaseException:
            self.order.pop(context_id, None)
            await ctx.shutdown()
            raise
        self.contexts[ctx.id] = ctx
        return ctx

    async def default(self, language: str) -> Context | NodeContext:
        """The default context of ``language``, started on first use (Python's and JavaScript's at start)."""
        task = self.defaults.get(language)
        if task is not None and task.done() and (task.cancelled() or task.exception() is not None
                                                 or task.result().id not in self.contexts):
            task = None  # failed to start, or deleted by a client: start another one
        if task is None:
            task = asyncio.create_task(self.create(language, DEFAULT_CWD))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # errors surface on use
            self.defaults[language] = task
        return await asyncio.shield(task)

    async def listing(self) -> list[dict]:
        """Every context, oldest first, once the default contexts being started are up (or failed)."""
        starting = [t for t in self.defaults.values() if not t.done()]
        if starting:
            await asyncio.wait(starting, timeout=DEFAULT_WAIT)
        return [c.info() for c in sorted(self.contexts.values(), key=lambda c: self.order.get(c.id, 0))]

    def get(self, context_id: str) -> Context | NodeContext:
        ctx = self.contexts.get(context_id)
        if ctx is None:
            raise HTTPError(404, f"Context {context_id} not found")
        return ctx

    async def remove(self, context_id: str) -> None:
        ctx = self.get(context_id)
        del self.contexts[ctx.id]
        self.order.pop(ctx.id, None)
        await ctx.shutdown()

    async def close(self) -> None:
        await asyncio.gather(*(ctx.shutdown() for ctx in self.contexts.values()), return_exceptions=True)


def _cwd(value: object) -> str:
    """A context's working directory: an existing absolute directory, or 400."""
    if value is None or value == "":
        return DEFAULT_CWD
    if not isinstance(value, str) or "\0" in value or not value.startswith("/"):
        raise HTTPError(400, "cwd must be an absolute path")
    if not os.path.isdir(value):
        raise HTTPError(400, f"cwd {value!r} is not a directory")
    return value


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
    def __init__(self, catalog: languages.Catalog) -> None:
        self.interpreter = Interpreter(catalog)

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
                return await _respond(writer, 200, await self.interpreter.listing())
            if method == "POST":
                req = _json_body(body)
                language = self.interpreter.language(req.get("language"))
                ctx = await self.interpreter.create(language, _cwd(req.get("cwd")))
                return await _respond(writer, 200, ctx.info())
        if len(parts) == 2 and parts[0] == "contexts" and method == "DELETE":
            await self.interpreter.remove(parts[1])
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
            ctx = await self.interpreter.default(self.interpreter.language(language))

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
    server = Server(languages.Catalog())
    try:
        listener = await asyncio.start_server(server.handle, HOST, PORT, limit=MAX_BODY, reuse_address=True)
    except OSError as exc:
        print(f"shoal-code-interpreter: cannot listen on {HOST}:{PORT}: {exc.strerror}", file=sys.stderr, flush=True)
        return 3
    # The default contexts start now, so that the first execute waits only for what is left of them.
    for language in DEFAULT_LANGUAGES:
        if language in server.interpreter.catalog.available():
            asyncio.create_task(server.interpreter.default(language)).add_done_callback(
                lambda t: t.cancelled() or t.exception())  # errors surface on use
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
