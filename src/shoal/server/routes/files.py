"""/v1/sandboxes/{id}/files: streamed download and upload, list, stat, mkdir, move, remove, watch."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Query, Request, Response
from pydantic import ValidationError
from starlette.responses import StreamingResponse

from shoal.errors import RuntimeFailure
from shoal.runtime.agent_aio import AsyncAgentClient
from shoal.server.models import Entry, MoveRequest, PathRequest
from shoal.server.routes.deps import running_agent
from shoal.server.streams import respond, wants_stream

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}/files", tags=["files"])
PathQ = Query(..., min_length=1, max_length=4096, description="Path inside the sandbox (relative: from /root).")
#: A download that ends within this many bytes is sent whole, with its exact length.
READ_AHEAD = 1024 * 1024


def _entry(raw: object) -> Entry:
    """An entry from the agent, checked: the agent is sandbox code, so a malformed one is its failure."""
    try:
        return Entry.model_validate(raw)
    except ValidationError as exc:
        raise RuntimeFailure("the sandbox agent answered with a malformed file entry") from exc


def _entries(reply: dict) -> list[Entry]:
    raw = reply.get("entries")
    if not isinstance(raw, list):
        raise RuntimeFailure("the sandbox agent answered a listing without entries")
    return [_entry(e) for e in raw]


@router.get("", response_class=StreamingResponse, responses={200: {"content": {"application/octet-stream": {}}}})
async def download(path: str = PathQ, user: str | None = None, agent: AsyncAgentClient = Depends(running_agent)):
    """The file's bytes up to its size at open, or to EOF if it reports size 0 (``/proc``, cgroupfs).

    A file that grows while it is sent (a log) downloads as it was when opened. Content-Length is
    exact: a body that fits the read-ahead is sent whole (so a sysfs file shorter than its nominal
    4096 bytes is fine), a longer one declares the size at open and never sends a byte more (the agent
    is sandbox code and may lie); if the file is truncated meanwhile, the response is cut short, so
    the client sees an error, never a shorter file that claims to be complete.
    """
    head, chunks = await agent.read_file(path, user)
    size = head.get("size") if isinstance(head, dict) else None
    declared = size if isinstance(size, int) and size > 0 else 0
    rest = aiter(chunks)
    first, ended = bytearray(), False
    try:
        while len(first) <= READ_AHEAD:
            try:
                first += await anext(rest)
            except StopAsyncIteration:
                ended = True
                break
    except BaseException:
        await _close(rest)
        raise
    if ended or 0 < declared <= len(first):
        await _close(rest)
        return Response(bytes(first[:declared] if declared else first), media_type="application/octet-stream")
    return StreamingResponse(_exactly(path, bytes(first), rest, declared or None),
                             media_type="application/octet-stream",
                             headers={"Content-Length": str(declared)} if declared else None)


async def _close(chunks: AsyncIterator[bytes]) -> None:
    close = getattr(chunks, "aclose", None)
    if close is not None:
        await close()


async def _exactly(path: str, first: bytes, rest: AsyncIterator[bytes], limit: int | None) -> AsyncIterator[bytes]:
    """``first`` then ``rest``, never more than ``limit`` bytes; ending short of it aborts the response."""
    sent = 0
    pending = first
    try:
        while True:
            if limit is not None:
                pending = pending[:limit - sent]
            if pending:
                yield pending
                sent += len(pending)
            if limit is not None and sent >= limit:
                return
            try:
                pending = await anext(rest)
            except StopAsyncIteration:
                break
        if limit is not None:
            raise RuntimeFailure(f"{path}: ended at byte {sent} of {limit} (truncated while it was sent?)")
    finally:
        await _close(rest)


@router.put("", response_model=Entry, openapi_extra={"requestBody": {
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
async def upload(request: Request, path: str = PathQ, user: str | None = None, mode: int | None = Query(None, ge=0,
                 le=0o7777), append: bool = False, agent: AsyncAgentClient = Depends(running_agent)) -> Entry:
    """The request body is the file's new content, streamed; the file is replaced atomically."""
    async def body() -> AsyncIterator[bytes]:
        async for chunk in request.stream():
            if chunk:
                yield chunk
    return _entry(await agent.write_file(path, body(), user=user, mode=mode, append=append))


@router.delete("", status_code=204)
async def remove(path: str = PathQ, agent: AsyncAgentClient = Depends(running_agent)) -> Response:
    await agent.call({"op": "file.remove", "path": path})
    return Response(status_code=204)


@router.get("/list", response_model=list[Entry])
async def list_dir(path: str = PathQ, depth: int = Query(1, ge=1, le=64),
                   agent: AsyncAgentClient = Depends(running_agent)) -> list[Entry]:
    return _entries(await agent.call({"op": "file.list", "path": path, "depth": depth}))


@router.get("/stat", response_model=Entry)
async def stat(path: str = PathQ, agent: AsyncAgentClient = Depends(running_agent)) -> Entry:
    return _entry((await agent.call({"op": "file.stat", "path": path})).get("entry"))


@router.post("/mkdir", response_model=Entry, status_code=201)
async def mkdir(body: PathRequest, agent: AsyncAgentClient = Depends(running_agent)) -> Entry:
    return _entry((await agent.call({"op": "file.mkdir", "path": body.path, "parents": True})).get("entry"))


@router.post("/move", response_model=Entry)
async def move(body: MoveRequest, agent: AsyncAgentClient = Depends(running_agent)) -> Entry:
    return _entry((await agent.call({"op": "file.move", "src": body.src, "dst": body.dst})).get("entry"))


@router.get("/watch", responses={200: {"content": {"application/x-ndjson": {}, "text/event-stream": {}}}})
async def watch(request: Request, path: str = PathQ, recursive: bool = False,
                agent: AsyncAgentClient = Depends(running_agent)):
    """Filesystem events under ``path`` until the client disconnects."""
    events = await agent.watch(path, recursive)

    async def typed() -> AsyncIterator[dict]:
        yield {"type": "started", "path": path}
        async for ev in events:
            yield {"type": ev["type"], "name": ev["name"], "path": ev["path"]}
    return respond(typed(), wants_stream(request, True) or "application/x-ndjson")
