"""/v1 snapshots and fork: take, list, get, delete snapshots; fork a sandbox; a snapshot as a template.

``POST /v1/sandboxes/{id}/snapshots`` → 201 the snapshot · ``GET /v1/snapshots`` (``?sandbox=``, ``?name=``)
· ``GET /v1/snapshots/{id or name}`` · ``DELETE /v1/snapshots/{id or name}`` → 204, 404, or 409 while a
sandbox or a stacked snapshot uses it · ``POST /v1/sandboxes/{id}/fork`` ``{"count": N}`` → 201 one entry
per fork (a sandbox or its own error); memory is never copied (``memory_copied: false``) ·
``POST /v1/snapshots/{id}/template`` ``{"name"}`` → 201 a template of its merged files.
Sandboxes start from a snapshot with ``POST /v1/sandboxes`` ``{"snapshot": ...}``.
"""

from __future__ import annotations

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from shoal.engine import Engine
from shoal.engine.fork import fork
from shoal.engine.keys import ApiKey
from shoal.errors import ShoalError
from shoal.server.auth import api_key
from shoal.server.models import (
    ForkError,
    ForkRequest,
    ForkResponse,
    ForkResult,
    Sandbox,
    Snapshot,
    SnapshotCreate,
    SnapshotTemplate,
)
from shoal.server.routes.deps import engine

router = APIRouter(prefix="/v1", tags=["snapshots"])


@router.post("/sandboxes/{sandbox_id}/snapshots", status_code=201, response_model=Snapshot)
async def create_snapshot(sandbox_id: str, body: SnapshotCreate | None = Body(None), key: ApiKey = Depends(api_key),
                          eng: Engine = Depends(engine)) -> Snapshot:
    """Freeze the sandbox, write its files as a snapshot, thaw it (a memory-paused one stays paused)."""
    name = body.name if body is not None else None
    return Snapshot.of(await run_in_threadpool(eng.snapshots.create, sandbox_id, name, key))


@router.get("/snapshots", response_model=list[Snapshot])
async def list_snapshots(key: ApiKey = Depends(api_key), eng: Engine = Depends(engine),
                         sandbox: str | None = Query(None, max_length=64, description="Only those of this sandbox."),
                         name: str | None = Query(None, max_length=64, description="Only this name (or id).")
                         ) -> list[Snapshot]:
    return [Snapshot.of(s) for s in eng.snapshots.list(key, sandbox_id=sandbox, name=name)]


@router.get("/snapshots/{ref}", response_model=Snapshot)
async def get_snapshot(ref: str, key: ApiKey = Depends(api_key), eng: Engine = Depends(engine)) -> Snapshot:
    return Snapshot.of(eng.snapshots.get(ref, key))


@router.delete("/snapshots/{ref}", status_code=204)
async def delete_snapshot(ref: str, key: ApiKey = Depends(api_key), eng: Engine = Depends(engine)) -> Response:
    await run_in_threadpool(eng.snapshots.delete, ref, key)
    return Response(status_code=204)


@router.post("/sandboxes/{sandbox_id}/fork", status_code=201, response_model=ForkResponse)
async def fork_sandbox(sandbox_id: str, request: Request, body: ForkRequest | None = Body(None),
                       key: ApiKey = Depends(api_key), eng: Engine = Depends(engine)) -> ForkResponse:
    """``count`` new running sandboxes with the parent's files (not its memory); the parent keeps running."""
    body = body or ForkRequest()
    results = await run_in_threadpool(fork, eng, sandbox_id, body.count, key, body.timeout)
    access = request.app.state.port_access
    out = []
    for r in results:
        if isinstance(r, ShoalError):
            out.append(ForkResult(error=ForkError(code=r.code, message=r.message)))
        else:
            sb = Sandbox.of(r)
            sb.public_traffic, sb.public_ports = access.publicity(sb.id)
            sb.traffic_access_token = access.tokens.traffic(sb.id)
            out.append(ForkResult(sandbox=sb))
    return ForkResponse(forks=out)


@router.post("/snapshots/{ref}/template", status_code=201)
async def snapshot_template(ref: str, body: SnapshotTemplate, key: ApiKey = Depends(api_key),
                            eng: Engine = Depends(engine)) -> dict:
    """A template (usable by every key, like any template) holding the snapshot's merged files."""
    from shoal.engine.snapshot_template import make_template
    info = await run_in_threadpool(make_template, eng, ref, body.name, key)
    return info.to_dict()
