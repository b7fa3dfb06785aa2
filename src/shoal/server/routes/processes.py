"""/v1/sandboxes/{id}/exec and /processes: run (whole or streamed), background, stdin, signals."""

from __future__ import annotations

import base64
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request, Response
from starlette.responses import JSONResponse

from shoal.errors import InvalidRequest
from shoal.runtime.agent_aio import AsyncAgentClient, AsyncProcessStream
from shoal.server.models import ExecRequest, ExecResult, ProcessInfo, SignalRequest, Started, StdinRequest
from shoal.server.plain_exec import PlainExec, PlainExecResponse, unless_disconnected
from shoal.server.routes.deps import running_agent
from shoal.server.streams import process_event, respond, wants_stream

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}", tags=["processes"])


def _start_request(body: ExecRequest) -> dict:
    if isinstance(body.cmd, str) and not body.cmd.strip():
        raise InvalidRequest("cmd must not be empty")
    argv = body.argv()
    if not argv or not argv[0]:
        raise InvalidRequest("cmd must not be empty")
    req: dict = {"cmd": argv, "env": body.env}
    for field in ("cwd", "user", "timeout", "tag"):
        if getattr(body, field) is not None:
            req[field] = getattr(body, field)
    if body.stdin is not None or body.stdin_open:
        req["stdin"] = True
    return req


async def _events(stream: AsyncProcessStream) -> AsyncIterator[dict]:
    yield {"type": "start", "pid": stream.pid}
    async for kind, data in stream.events():
        yield process_event(kind, data)


@router.post("/exec", response_model=ExecResult, responses={200: {"content": {
    "application/x-ndjson": {}, "text/event-stream": {}}, "description": "Result, or a stream of events."}})
async def exec_command(body: ExecRequest, request: Request, agent: AsyncAgentClient = Depends(running_agent)):
    started = time.perf_counter()
    runtime = request.app.state.engine.runtime
    job = PlainExec(lambda: runtime.oom_kills(agent.sandbox_id))  # bounded output; counts OOM kills from the start
    stream = await agent.start(_start_request(body), before=job.count_oom_kills)
    if body.stdin is not None:
        await stream.send_stdin(body.stdin.encode())
        if not body.stdin_open:
            await stream.control({"op": "close_stdin"})
    if body.background:
        stream.close()
        return JSONResponse(Started(pid=stream.pid).model_dump())
    media = wants_stream(request, body.stream)
    if media:
        return respond(_events(stream), media, on_close=stream.close)
    try:
        result = await unless_disconnected(job.wait(stream, body.timeout), request.receive)
    except BaseException:
        job.release()
        raise
    finally:
        stream.close()
    if result is None:
        job.release()
        return Response(status_code=499)  # nobody reads it: the caller disconnected
    request.app.state.metrics.exec_seconds.observe(time.perf_counter() - started)
    return PlainExecResponse(result, job)


@router.get("/processes", response_model=list[ProcessInfo])
async def list_processes(agent: AsyncAgentClient = Depends(running_agent)) -> list[ProcessInfo]:
    reply = await agent.call({"op": "process.list"})
    return [ProcessInfo(**{k: p.get(k) for k in ProcessInfo.model_fields}) for p in reply["processes"]]


@router.get("/processes/{pid}/stream", responses={200: {"content": {"application/x-ndjson": {},
                                                                       "text/event-stream": {}}}})
async def follow_process(pid: int, request: Request, agent: AsyncAgentClient = Depends(running_agent)):
    """Output of a running process from now on, as a stream of events."""
    stream = await agent.connect_process(pid=pid)
    return respond(_events(stream), wants_stream(request, True) or "application/x-ndjson", on_close=stream.close)


@router.post("/processes/{pid}/signal", status_code=204)
async def signal_process(pid: int, body: SignalRequest, agent: AsyncAgentClient = Depends(running_agent)) -> Response:
    await agent.call({"op": "process.signal", "pid": pid, "signal": body.signal})
    return Response(status_code=204)


@router.delete("/processes/{pid}", status_code=204)
async def kill_process(pid: int, agent: AsyncAgentClient = Depends(running_agent)) -> Response:
    await agent.call({"op": "process.signal", "pid": pid, "signal": 9})
    return Response(status_code=204)


@router.post("/processes/{pid}/stdin", status_code=204)
async def write_stdin(pid: int, body: StdinRequest, agent: AsyncAgentClient = Depends(running_agent)) -> Response:
    if body.data_b64 is not None:
        try:
            data = base64.b64decode(body.data_b64, validate=True)
        except ValueError as exc:  # binascii.Error, and non-ASCII input
            raise InvalidRequest("data_b64 is not valid base64") from exc
    else:
        data = body.data.encode()
    await agent.call({"op": "process.stdin", "pid": pid, "data_b64": base64.b64encode(data).decode()})
    return Response(status_code=204)


@router.post("/processes/{pid}/stdin/close", status_code=204)
async def close_stdin(pid: int, agent: AsyncAgentClient = Depends(running_agent)) -> Response:
    await agent.call({"op": "process.close_stdin", "pid": pid})
    return Response(status_code=204)
