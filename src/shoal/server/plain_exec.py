"""A plain exec: run a command to its end, answer its output as one JSON object, and stay bounded.

Sandbox code decides how much it prints and the caller may walk away, so a plain exec

* keeps at most ``max_output()`` bytes of each stream (16 MiB by default), under the daemon-wide
  ``output_budget.BUDGET``; the rest is drained (the command runs to its end, its exit status is
  real) and the answer says ``stdout_truncated``/``stderr_truncated``. Streaming gets everything;
* encodes a big answer in slices, yielding to the event loop between them and sending each as it
  is made (chunked), so neither ``/health`` nor other requests wait behind a 16 MiB ``json.dumps``
  and the daemon never holds more than the kept bytes plus one slice per answer;
* stops waiting when the caller disconnects: the agent connection (a daemon fd) is closed at once.
  The process keeps running, like any process whose follower went away (its timeout still holds);
* waits at most the command's timeout plus ``AGENT_TIMEOUT`` for the end: an agent that stops
  answering mid-command (sandbox root can stop it) gives ``AgentUnavailable``, not a hung request.

Used by the exec fast path (``fastpath.py``) and the FastAPI route (``routes/processes.py``).
"""

from __future__ import annotations

import asyncio
import codecs
import json
import signal
from collections.abc import Awaitable, Callable, Iterator, MutableMapping
from typing import Any

from starlette.responses import Response

from shoal.runtime import agent_aio
from shoal.runtime.agent_aio import AsyncAgentClient, AsyncProcessStream
from shoal.runtime.agent_client import ExecResult
from shoal.runtime.output_budget import BUDGET, CappedOutput, max_output

Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

#: Answers with at most this much output are encoded in one go (the common case, and the fastest).
SMALL_ANSWER = 256 * 1024
#: Bytes of output encoded per slice of a big answer (at most ~6x this as JSON text).
SLICE = 256 * 1024


class PlainExec:
    """One plain exec's kept output; ``release`` returns its bytes to the daemon-wide budget."""

    def __init__(self, oom_kills: Callable[[], int | None] | None = None) -> None:
        cap = max_output()
        self.out, self.err = CappedOutput(cap, BUDGET), CappedOutput(cap, BUDGET)
        #: the sandbox's OOM kill count, read before the command starts (``count_oom_kills``, handed to
        #: ``AsyncAgentClient.start`` as its ``before``) and again if it ends by SIGKILL
        self._oom_kills = oom_kills
        self._oom_before: int | None = None

    def count_oom_kills(self) -> None:
        if self._oom_kills is not None:
            self._oom_before = self._oom_kills()

    async def run(self, agent: AsyncAgentClient, start: dict, stdin: bytes | None, close_stdin: bool,
                  receive: Receive) -> ExecResult | None:
        """The finished command, or None if the caller disconnected first."""
        return await unless_disconnected(self._run(agent, start, stdin, close_stdin), receive)

    async def _run(self, agent: AsyncAgentClient, start: dict, stdin: bytes | None, close_stdin: bool) -> ExecResult:
        stream = await agent.start(start, before=self.count_oom_kills)
        try:
            if stdin is not None:
                await stream.send_stdin(stdin)
            if close_stdin:
                await stream.control({"op": "close_stdin"})
            return await self.wait(stream, start.get("timeout"))
        finally:
            stream.close()

    async def wait(self, stream: AsyncProcessStream, timeout: float | None) -> ExecResult:
        limit = None if timeout is None else float(timeout) + agent_aio.AGENT_TIMEOUT
        async with agent_aio.bounded(limit, stream.conn.sandbox_id, "end the command after its timeout"):
            result = await stream.wait(self.out, self.err)
        if result.signal == signal.SIGKILL and self._oom_kills is not None and self._oom_before is not None:
            after = self._oom_kills()
            result.oom_killed = after is not None and after > self._oom_before
        return result

    def release(self) -> None:
        self.out.release()
        self.err.release()


#: A plain exec starts watching for its caller's disconnect only after this long: most end sooner
#: (``true`` takes ~1.5 ms), and a watcher is a task of its own, made and cancelled on every call.
WATCH_AFTER = 0.02


async def unless_disconnected(work: Awaitable[Any], receive: Receive) -> Any:
    """``await work``, unless the HTTP client disconnects first: then cancel it and return None.

    The work runs in the caller's task (no second task on the hot path); a watcher task, started once
    the work has run ``WATCH_AFTER`` seconds, cancels it. So an abandoned call lets its agent connection
    go within ``WATCH_AFTER`` of the disconnect, or of its start if the caller had already left."""
    me = asyncio.current_task()
    assert me is not None
    gone = finished = False
    watcher: asyncio.Task | None = None

    def disconnected(task: asyncio.Task) -> None:
        nonlocal gone
        if not finished and not task.cancelled() and task.exception() is None:
            gone = True
            me.cancel()

    def watch() -> None:
        nonlocal watcher
        watcher = asyncio.ensure_future(_disconnect(receive))
        watcher.add_done_callback(disconnected)
    timer = me.get_loop().call_later(WATCH_AFTER, watch)
    try:
        return await work
    except asyncio.CancelledError:
        if not gone:
            raise  # cancelled for another reason (shutdown)
        me.uncancel()
        return None
    finally:
        finished = True  # a callback already scheduled must not cancel what the caller does next
        timer.cancel()
        if watcher is not None:
            watcher.cancel()


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _head(result: ExecResult) -> dict:
    return {"pid": result.pid, "exit_code": result.exit_code, "signal": result.signal,
            "timed_out": result.timed_out, "stdout_truncated": result.stdout_truncated,
            "stderr_truncated": result.stderr_truncated, "oom_killed": result.oom_killed}


def _json_string_parts(data: bytes | bytearray) -> Iterator[bytes]:
    """``data`` decoded as UTF-8 (invalid bytes replaced) as the inside of a JSON string, in slices.

    The incremental decoder gives exactly what ``data.decode("utf-8", "replace")`` gives, and JSON
    escapes each character on its own, so the parts join to what ``json.dumps`` of the whole makes."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    view = memoryview(data)
    for start in range(0, len(data), SLICE):
        text = decoder.decode(view[start:start + SLICE], start + SLICE >= len(data))
        yield json.dumps(text)[1:-1].encode("ascii")


async def send_result(send: Send, result: ExecResult) -> None:
    """The answer of a finished plain exec: one JSON object (``ExecResult`` in ``server/models.py``)."""
    head = _head(result)
    if len(result.stdout_bytes) + len(result.stderr_bytes) <= SMALL_ANSWER:
        data = json.dumps({**head, "stdout": result.stdout, "stderr": result.stderr}, separators=(",", ":")).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})
        return
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    opening = json.dumps(head, separators=(",", ":"))[:-1]
    await send({"type": "http.response.body", "body": (opening + ',"stdout":"').encode(), "more_body": True})
    for name, data in (("stdout", result.stdout_bytes), ("stderr", result.stderr_bytes)):
        if name == "stderr":
            await send({"type": "http.response.body", "body": b'","stderr":"', "more_body": True})
        for part in _json_string_parts(data):
            await send({"type": "http.response.body", "body": part, "more_body": True})
            await asyncio.sleep(0)  # a write that did not block did not yield: let other requests in
    await send({"type": "http.response.body", "body": b'"}'})


class PlainExecResponse(Response):
    """A FastAPI route's answer for a finished plain exec: ``send_result``, then the budget back."""

    def __init__(self, result: ExecResult, job: PlainExec) -> None:
        super().__init__(status_code=200, media_type="application/json")
        self.result, self.job = result, job

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        try:
            await send_result(send, self.result)
        finally:
            self.job.release()
