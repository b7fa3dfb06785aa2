"""A JavaScript or TypeScript context: one ``node js_kernel.js`` process, driven over pipes (runs INSIDE the sandbox).

Same interface as ``kernel_server.Context`` (start, execute, restart, shutdown, interrupt, info),
so the HTTP layer does not care which kind a context is. Why not Jupyter: see ``js_kernel.js``.

Replies come on a pipe of their own (the runner's fd given on its command line), not on its
stdout, so nothing user code prints can end a cell early or forge a result. What the runner's
fd 1/2 carry (child processes of user code) goes to the running execution as stdout/stderr.
Interrupting a cell (its client left) kills the process and starts a fresh one: node cannot stop
a busy loop from outside, and a context that is still busy would block every later cell.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import os
import signal

from languages import JS_RUNNER

#: A reply line (a result or one write of output) is at most this long.
MAX_LINE = 64 * 1024 * 1024
START_TIMEOUT = 30.0


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def _error(name: str, value: str, traceback: str = "") -> dict:
    return {"type": "error", "name": name, "value": value, "traceback": traceback}


class NodeContext:
    def __init__(self, language: str, cwd: str, context_id: str) -> None:
        self.id = context_id
        self.language = language
        self.cwd = cwd
        self.lock = asyncio.Lock()  # one cell at a time
        self.proc: asyncio.subprocess.Process | None = None
        self.replies: asyncio.StreamReader | None = None
        self.pumps: list[asyncio.Task] = []
        self.emit = None  # the running execution's sink, for output of child processes
        self.running: str | None = None
        self.generation = 0
        self.count = 0
        self._tokens = itertools.count(1)

    def info(self) -> dict:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    async def start(self) -> None:
        read_fd, write_fd = os.pipe()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                "node", JS_RUNNER, str(write_fd), self.language, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, pass_fds=(write_fd,), cwd=self.cwd,
                start_new_session=True)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_LINE)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb", 0))
        self.replies = reader
        self.pumps = [asyncio.create_task(self._forward(self.proc.stdout, "stdout")),
                      asyncio.create_task(self._forward(self.proc.stderr, "stderr"))]
        try:
            first = await asyncio.wait_for(reader.readline(), START_TIMEOUT)
        except TimeoutError:
            first = b""
        if not first.startswith(b'{"type":"ready"'):
            await self._stop()
            raise RuntimeError("the JavaScript runtime (node) did not start")

    async def _forward(self, stream: asyncio.StreamReader, kind: str) -> None:
        while chunk := await stream.read(65536):
            if self.emit is not None:
                self.emit({"type": kind, "text": chunk.decode("utf-8", "replace"), "timestamp": _now()})

    async def _stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.returncode is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the runner and whatever user code spawned
            except ProcessLookupError:
                pass
            await proc.wait()
        for task in self.pumps:
            task.cancel()
        self.pumps = []
        self.replies = None

    async def restart(self) -> None:
        self.generation += 1
        await self._stop()
        await self.start()

    async def shutdown(self) -> None:
        self.generation += 1
        await self._stop()

    async def interrupt(self, token: str) -> None:
        """The client of cell ``token`` left: kill the runner; the cell then starts a fresh one."""
        if self.running == token and self.proc is not None and self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    async def execute(self, code: str, env_vars: dict[str, str], emit) -> None:  # noqa: ANN001
        async with self.lock:
            if self.proc is None or self.replies is None:
                emit(_error("ContextNotReady", "the context's JavaScript runtime is not running"))
                return
            generation, replies = self.generation, self.replies
            self.count += 1
            emit({"type": "number_of_executions", "execution_count": self.count})
            self.running = f"js-{next(self._tokens)}"
            self.emit = emit
            try:
                self.proc.stdin.write((json.dumps({"code": code, "env": env_vars}) + "\n").encode())
                await self.proc.stdin.drain()
                while True:
                    line = await replies.readline()
                    if not line:
                        emit(_error("ContextRestarting", "Context was restarted (the JavaScript runtime exited)"))
                        if generation == self.generation:  # nobody restarted it meanwhile: do it now
                            self.generation += 1
                            await self._stop()
                            await self.start()
                        return
                    reply = json.loads(line)
                    kind = reply.get("type")
                    if kind == "done":
                        return
                    if kind in ("stdout", "stderr"):
                        emit({"type": kind, "text": str(reply.get("text", "")), "timestamp": _now()})
                    elif kind == "result":
                        emit({"type": "result", "text": str(reply.get("text", "")), "is_main_result": True})
                    elif kind == "error":
                        emit(_error(str(reply.get("name", "Error")), str(reply.get("value", "")),
                                    str(reply.get("traceback", ""))))
            except (ConnectionError, ValueError) as exc:
                emit(_error("ContextRestarting", f"Context was restarted ({exc})"))
                if generation == self.generation:
                    self.generation += 1
                    await self._stop()
                    await self.start()
            finally:
                self.emit = None
                self.running = None
