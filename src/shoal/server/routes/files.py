"""/v1/sandboxes/{id}/files: streamed download and upload, list, stat, mkdir, move, remove, watch."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Query, Request, Response
from starlette.responses import StreamingResponse

from shoal.runtime.agent_aio import AsyncAgentClient
from shoal.server.models import Entry, MoveRequest, PathRequest
from shoal.server.routes.deps import running_agent
from shoal.server.streams import respond, wants_stream

router = APIRouter(prefix="/v1/sandboxes/{sandbox_id}/files", tags=["files"])
PathQ = Query(..., min_length=1, max_length=4096, description="Path inside the sandbox (relative: from /root).")


@router.get("", response_class=StreamingResponse, responses={200: {"content": {"application/octet-stream": {}}}})
async def download(path: str = PathQ, user: str | None = None, agent: AsyncAgentClient = Depends(running_agent)):
    entry, chunks = await agent.read_file(path, user)
    return StreamingResponse(chunks, media_type="application/octet-stream",
                             headers={"Content-Length": str(entry["size"])} if entry["type"] == "file" else None)


@router.put("", response_model=Entry, openapi_extra={"requestBody": {
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}})
async def upload(request: Request, path: str = PathQ, user: str | None = None, mode: int | None = Query(None, ge=0,
                 le=0o7777), append: bool = False, agent: AsyncAgentClient = Depends(running_agent)) -> Entry:
    """The request body is the file's new content, streamed; the file is replaced atomically."""
    async def body() -> AsyncIterator[bytes]:
        async for chunk in request.stream():
            if chunk:
                yield chunk
    return Entry(**(await agent.write_file(path, body(), user=user, mode=mode, append=append)))


@router.delete("", status_code=204)
async def remove(path: str = PathQ, agent: AsyncAgentClient = Depends(running_agent)) -> Response:
    await agent.call({"op": "file.remove", "path": path})
    return Response(status_code=204)


@router.get("/list", response_model=list[Entry])
async def list_dir(path: str = PathQ, depth: int = Query(1, ge=1, le=64),
                   agent: AsyncAgentClient = Depends(running_agent)) -> list[Entry]:
    return [Entry(**e) for e in (await agent.call({"op": "file.list", "path": path, "depth": depth}))["entries"]]


@router.get("/stat", response_model=Entry)
async def stat(path: str = PathQ, agent: AsyncAgentClient = Depends(running_agent)) -> Entry:
    return Entry(**(await agent.call({"op": "file.stat", "path": path}))["entry"])


@router.post("/mkdir", response_model=Entry, status_code=201)
async def mkdir(body: PathRequest, agent: AsyncAgentClient = Depends(running_agent)) -> Entry:
    return Entry(**(await agent.call({"op": "file.mkdir", "path": body.path, "parents": True}))["entry"])


@router.post("/move", response_model=Entry)
async def move(body: MoveRequest, agent: AsyncAgentClient = Depends(running_agent)) -> Entry:
    return Entry(**(await agent.call({"op": "file.move", "src": body.src, "dst": body.dst}))["entry"])


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
